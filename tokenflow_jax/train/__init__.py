"""What every trainer shares: the loop's pieces (loop.py), optimisers (optim.py), decoder init from HF weights
(llm_init.py). The trainers themselves live in ``tokenflow_jax.recipes``."""
