"""Language-model access: hooks by TransformerLens name, splicing, the built-in offline model, activations."""
