"""Training/evaluation engine shared by every stage and head (one Trainer, one config setup)."""

from .setup import (  # noqa: F401
    check_runtime,
    default_argument_parser,
    launch_main,
    load_cfg,
    run_cli,
    run_worker,
    setup_cfg,
)
from .trainer import Trainer  # noqa: F401
from .predictor import PartPredictor  # noqa: F401
