"""Pure algorithm code: torch/numpy only. Never imports lightning, hydra, vllm or transformers."""
