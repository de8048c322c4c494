#!/usr/bin/env python
"""Write the image manifest of an unlabelled ImageNet-style folder (``<root>/<synset>/<image>``).

    python datasets/prepare_image_list.py --root DIR --out MANIFEST [--with-size] [--workers N]

The manifest is a UTF-8 text file: one header line, then one tab-separated line per image::

    #path	synset[	width	height]
    n01440764/n01440764_10026.JPEG	n01440764	250	188

``path`` is relative to ``--root``; ``synset`` is its first path component (the class folder). The
tree is walked with ``os.scandir`` one directory at a time, entries sorted by name, so the output is
deterministic and memory is bounded by the largest single directory (not by the 14M images of
ImageNet-21K): lines are streamed to ``MANIFEST.<random>.tmp`` next to ``--out``, which is renamed
onto ``--out`` only when the walk has finished. ``--with-size`` reads width/height from each image
header (PIL's lazy open; pixels are never decoded), ``--workers`` threads at a time; an image whose
header cannot be read is skipped, counted and reported with a warning. Files outside a synset folder,
names containing tabs or newlines and unreadable folders are skipped the same way.
"""

import argparse
import logging
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger("prepare_image_list")

DEFAULT_EXTENSIONS = (".jpeg", ".jpg", ".png")
HEADER = "#path\tsynset"
SIZE_HEADER = "\twidth\theight"
_MAX_NAMED_WARNINGS = 20


def iter_image_dirs(root, extensions=DEFAULT_EXTENSIONS, stats=None):
    """Yield ``(relative dir, sorted image file names)`` depth-first, folders sorted by name.

    A generator: only the directory being listed (and the stack of pending sibling names) is held
    in memory. Unreadable folders are skipped and counted in ``stats["unreadable_dirs"]``.
    """
    stats = stats if stats is not None else {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                entries = sorted(((e.name, e.is_dir()) for e in it), key=lambda e: e[0])
        except OSError as e:
            stats["unreadable_dirs"] = stats.get("unreadable_dirs", 0) + 1
            logger.warning("skipping unreadable folder %s: %s", os.path.join(root, rel), e)
            continue
        files = [n for n, is_dir in entries if not is_dir and n.lower().endswith(tuple(extensions))]
        if files:
            yield rel, files
        # Reverse so that popping from the end visits sub-folders in sorted order.
        stack.extend(os.path.join(rel, n) for n, is_dir in reversed(entries) if is_dir)


def read_size(path):
    """(width, height) from the image header, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:  # lazy: parses the header only
            return image.size
    except Exception as e:  # noqa: BLE001  (PIL raises many types for broken files)
        logger.debug("cannot read %s: %s", path, e)
        return None


def _warn_skip(stats, key, message, *args):
    stats[key] = stats.get(key, 0) + 1
    if stats[key] <= _MAX_NAMED_WARNINGS:
        logger.warning(message, *args)
    elif stats[key] == _MAX_NAMED_WARNINGS + 1:
        logger.warning("more %s files; only their count is reported from now on", key)


def write_manifest(root, out, with_size=False, workers=8, progress=True, extensions=DEFAULT_EXTENSIONS):
    """Walk ``root`` and write the manifest to ``out`` atomically (temp file + rename).

    Returns:
        dict: ``written`` and the skip counters (``unreadable``, ``no_synset``, ``bad_name``,
        ``unreadable_dirs``), each present when non-zero.
    """
    from tqdm import tqdm

    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    stats = {"written": 0}
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=out_dir)
    pool = ThreadPoolExecutor(max(1, workers)) if with_size else None
    try:
        with (
            os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f,
            tqdm(unit=" img", disable=not progress, mininterval=1.0, desc="manifest") as bar,
        ):
            f.write(HEADER + (SIZE_HEADER if with_size else "") + "\n")
            for rel_dir, names in iter_image_dirs(root, extensions, stats):
                rels = []
                for name in names:
                    rel = os.path.join(rel_dir, name)
                    if "\t" in rel or "\n" in rel or "\r" in rel:
                        _warn_skip(stats, "bad_name", "skipping %r: tabs/newlines cannot be listed", rel)
                    elif not rel_dir:
                        _warn_skip(stats, "no_synset", "skipping %s: not inside a synset folder", rel)
                    else:
                        rels.append(rel)
                synset = rel_dir.split(os.sep, 1)[0]
                if with_size:
                    sizes = pool.map(read_size, [os.path.join(root, r) for r in rels])
                else:
                    sizes = (None for _ in rels)
                for rel, size in zip(rels, sizes):
                    if with_size and size is None:
                        _warn_skip(
                            stats,
                            "unreadable",
                            "skipping unreadable image %s",
                            os.path.join(root, rel),
                        )
                        continue
                    line = rel.replace(os.sep, "/") + "\t" + synset
                    if size is not None:
                        line += f"\t{size[0]}\t{size[1]}"
                    f.write(line + "\n")
                    stats["written"] += 1
                bar.update(len(names))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the manifest normal permissions
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="image folder: <root>/<synset>/<image>")
    parser.add_argument("--out", required=True, help="manifest to write (e.g. <root>_manifest.tsv)")
    parser.add_argument("--with-size", action="store_true", help="add width/height read from image headers")
    parser.add_argument("--workers", type=int, default=8, help="threads reading image headers (--with-size)")
    parser.add_argument(
        "--extensions",
        default=",".join(DEFAULT_EXTENSIONS),
        help="comma-separated, case-insensitive",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    extensions = tuple(e.strip().lower() for e in args.extensions.split(",") if e.strip())
    try:
        stats = write_manifest(args.root, args.out, args.with_size, args.workers, not args.no_progress, extensions)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = {k: v for k, v in stats.items() if k != "written" and v}
    logger.info(
        "wrote %d images to %s%s",
        stats["written"],
        args.out,
        f"; skipped {skipped}" if skipped else "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
