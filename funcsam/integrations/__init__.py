"""Integrations with training frameworks, each imported explicitly: ``import funcsam`` imports none of them."""
