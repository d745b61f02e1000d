"""The checkout's entry point, the same as the installed ``dibs-train`` (``dibs.train``):

python train.py                                   # the embedded default (CPU, a few minutes)
python train.py algo=raft allocation.n_per_prompt=8
python train.py -m seed=0,1,2                     # a sweep
"""

from dibs.train import cli

if __name__ == "__main__":
    cli()
