"""One model that generates images and answers questions (models/unified.py), built on the t2i and VLM recipes."""
