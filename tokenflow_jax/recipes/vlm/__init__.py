"""Understanding: a LLaVA-style decoder on TokenFlow features (setup, training, answers, VQA evaluation)."""
