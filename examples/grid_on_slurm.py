"""A method-comparison grid as SLURM jobs: ``mtlkit compare --launcher submitit``.

The same grid that ``mtlkit compare --jobs N`` runs on this machine (two methods on a small
MultiDigits, one seed, their single-task baselines), each run one job: submitit writes the job
scripts and logs under ``OUT/submitit``, a finished run is skipped when the command is run again,
an interrupted one resumes, and ``OUT/results.csv`` is collected as the jobs end. The grid folder
must be on a file system the nodes share. Needs ``pip install "mtlkit[submitit]"``.

    python examples/grid_on_slurm.py OUT                       # submitit's local executor here
    python examples/grid_on_slurm.py OUT --cluster slurm --partition gpu --time 60 --gpus 1

On a machine without ``sbatch`` ``--cluster local`` (the default here) runs the jobs as local
subprocesses, as the CI does; on a cluster, ``--cluster slurm`` and its options (``--partition``,
``--time`` in minutes, ``--gpus``, ``--cpus``, ``--mem-gb``, ``--account``, ``--qos``,
``--constraint``) become the ``#SBATCH`` lines.
"""

from __future__ import annotations

import sys

from mtlkit.app.cli import main as mtlkit

GRID = [
    "data_args.n_train=256",
    "data_args.n_val=64",
    "data_args.n_test=64",
    "batch_size=64",
    "epochs=1",
    "plots=false",
    "methods=[ew,mgda]",
    "strategies=[joint]",
    "seeds=[0]",
]


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    out, options = argv[0], argv[1:]
    if "--cluster" not in options:
        options = ["--cluster", "local", *options]
    return mtlkit(["compare", "--launcher", "submitit", *options, "--out", out, *GRID])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
