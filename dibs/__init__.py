"""dibs: dynamic inference budget scheduling for chain-of-thought training (GVM-RAFT)."""

__version__ = "0.1.0"
