"""The algorithmic-problem model zoo: tiny transformers trained by saelab on tasks whose algorithm is known.

`tasks.py` declares the seven tasks (generator, vocabulary, probe variable, architecture, recipe), `model.py`
trains, saves, loads and measures their models, `weights/<name>/` holds the shipped models and `cli.py` is
`saelab zoo`. Every other stage reads a zoo model as `--model zoo:NAME`.
"""
