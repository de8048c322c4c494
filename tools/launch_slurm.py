#!/usr/bin/env python
"""Run tools/train_net.py on a SLURM cluster through submitit: one task per GPU over ``--nodes`` nodes.

    python tools/launch_slurm.py --config-file configs/stage2_proposals.yaml --nodes 4 --gpus-per-node 8 \
        --partition learnlab --timeout 4320 [--account ACC] [--qos QOS] [--resume] [KEY VALUE ...]

Every argument of train_net.py is accepted (``--eval-only``, ``--resume``, config overrides at the end);
``--num-gpus``/``--num-machines``/``--machine-rank``/``--dist-url`` are set per task from submitit's
JobEnvironment: machine rank = the task's node, ``--dist-url tcp://<first node's hostname>:<port>`` with a
port derived from the job id (``--port`` fixes it). Each task joins the process group itself (NCCL on
GPUs, gloo otherwise) instead of detectron2's ``launch`` spawning workers.

When SLURM preempts the job or its time limit approaches, submitit calls :meth:`TrainJob.checkpoint`, which
requeues the same command with ``--resume``: training continues from OUTPUT_DIR/last_checkpoint
(detectron2 writes one every SOLVER.CHECKPOINT_PERIOD iterations).

``--cluster debug`` runs the job in this process (submitit's debug executor; one task), ``--cluster local``
in a local subprocess: both are for trying a command without a cluster.
"""

import copy
import importlib.util
import os
import zlib

from part_distillation.engine import default_argument_parser, load_cfg, run_cli

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_NET = os.path.join(TOOLS_DIR, "train_net.py")


def get_parser():
    parser = default_argument_parser(epilog=__doc__)
    slurm = parser.add_argument_group("slurm (submitit)")
    slurm.add_argument("--nodes", type=int, default=1, help="number of nodes")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = tasks per node")
    slurm.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loading)")
    slurm.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    slurm.add_argument("--partition", default=None, help="SLURM partition")
    slurm.add_argument("--timeout", type=int, default=72 * 60, help="time limit of one job in minutes (requeued after)")
    slurm.add_argument("--account", default=None, help="SLURM account (optional)")
    slurm.add_argument("--qos", default=None, help="SLURM quality of service (optional)")
    slurm.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. volta32gb (optional)")
    slurm.add_argument("--comment", default=None, help="SLURM comment (optional)")
    slurm.add_argument("--job-name", default="part_distillation", help="SLURM job name")
    slurm.add_argument("--job-dir", default=None, help="submitit logs/pickles; default OUTPUT_DIR/slurm")
    slurm.add_argument("--port", type=int, default=0, help="rendezvous port on the first node; 0 = from the job id")
    slurm.add_argument(
        "--cluster",
        default="slurm",
        choices=("slurm", "local", "debug"),
        help="submitit executor: slurm, local (a subprocess) or debug (in this process, one task)",
    )
    return parser


def rendezvous_port(job_id: str) -> int:
    """A port in [20000, 40000) that every task of job ``job_id`` computes alike."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 20000


def executor_parameters(args) -> dict:
    """submitit AutoExecutor parameters for ``args`` (generic ones, and ``slurm_*`` ones SLURM uses)."""
    params = {
        "name": args.job_name,
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "tasks_per_node": args.gpus_per_node,  # one task per GPU
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout,
        "mem_gb": args.mem_gb,
        "slurm_partition": args.partition,
        "slurm_signal_delay_s": 120,  # USR2 two minutes before the limit: time to requeue with --resume
    }
    optional = {
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_comment": args.comment,
    }
    params.update({k: v for k, v in optional.items() if v})
    return {k: v for k, v in params.items() if v is not None}


def task_args(args, env):
    """train_net.py arguments of the task described by submitit JobEnvironment ``env``."""
    args = copy.deepcopy(args)
    if env.num_tasks % env.num_nodes:
        raise RuntimeError(f"{env.num_tasks} tasks cannot be spread evenly over {env.num_nodes} nodes")
    args.num_machines = env.num_nodes
    args.num_gpus = env.num_tasks // env.num_nodes
    args.machine_rank = env.node
    port = args.port or rendezvous_port(env.job_id)
    args.dist_url = f"tcp://{env.hostnames[0]}:{port}"
    return args


def _load_train_net():
    spec = importlib.util.spec_from_file_location("part_distillation_train_net", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _join_process_group(args, local_rank: int) -> None:
    """What detectron2's launch does in each spawned worker, for a task SLURM started."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    world_size = args.num_machines * args.num_gpus
    rank = args.machine_rank * args.num_gpus + local_rank
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if has_gpu else "gloo", init_method=args.dist_url, world_size=world_size, rank=rank
    )
    comm.create_local_process_group(args.num_gpus)
    comm.synchronize()


class TrainJob:
    """The callable submitit runs in every task: train_net.main with this task's distributed arguments."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        args = task_args(self.args, env)
        train_net = _load_train_net()
        if args.num_machines * args.num_gpus > 1:
            _join_process_group(args, env.local_rank)
        return train_net.checked_main(args)

    def checkpoint(self, *unused_args, **unused_kwargs):
        """Requeue (preemption / time limit) as the same job continuing from its last checkpoint."""
        import submitit

        args = copy.deepcopy(self.args)
        args.resume = True
        return submitit.helpers.DelayedSubmission(type(self)(args))


def build_executor(args, job_dir: str):
    import submitit

    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster)
    executor.update_parameters(**executor_parameters(args))
    return executor


def submit(args):
    cfg = load_cfg(args.config_file, args.opts)  # a config mistake fails here, not in the queue
    job_dir = args.job_dir or os.path.join(cfg.OUTPUT_DIR, "slurm", "%j")
    executor = build_executor(args, job_dir)
    job = executor.submit(TrainJob(args))
    print(f"Submitted job {job.job_id} ({args.nodes} node(s) x {args.gpus_per_node} GPU(s)); logs in {job_dir}")
    return job


def main():
    args = get_parser().parse_args()
    job = run_cli(submit, args)
    if args.cluster == "debug":
        return job.result()
    return job


if __name__ == "__main__":
    main()
