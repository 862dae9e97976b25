"""osteo's shipped recipes, installed as the package ``osteo.recipes`` (see pyproject.toml).

Each file defines ``recipe(backbone=...) -> osteo.recipe.Recipe`` and is loaded by
name with ``osteo train NAME``; a registered model name trains with ``finetune``.
"""
