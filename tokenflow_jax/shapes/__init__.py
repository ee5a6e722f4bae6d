"""The built-in shapes world: procedural scenes and captions, VQA questions, vocabularies, the ShapesEval
detector."""
