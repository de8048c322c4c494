"""Training/evaluation engine shared by every stage and head (one Trainer, one config setup)."""
from .setup import check_runtime, default_argument_parser, load_cfg, run_cli, run_worker, setup_cfg  # noqa: F401
from .trainer import Trainer  # noqa: F401
