"""kdbench: a configuration-driven workbench for knowledge distillation.

Importing the package is cheap; torch, Lightning and MLflow load where they are used.
"""

__version__ = "0.1.0"
