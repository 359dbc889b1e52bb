"""funcsam inside training frameworks, one module per framework, each imported explicitly.

``import funcsam`` never imports a framework: ``from funcsam.integrations.huggingface import SAMTrainer``
imports transformers and accelerate, as the Lightning and timm modules import theirs.
"""
