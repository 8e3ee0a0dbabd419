"""Data: datasets (``datasets``), chat formatting (``chat``), image checks (``images``, ``validate``),
collation for the learner (``collate``, ``tokens``, ``lengths``) and synthetic visual tasks (``synthetic``).

Import the submodules directly; this package imports nothing heavy on its own.
"""
