# The two commands of the README. Each sets up .venv/ first (scripts/bootstrap.sh).
.PHONY: serve test lint bench

serve:
	@scripts/bootstrap.sh
	.venv/bin/lossd serve

test:
	@scripts/bootstrap.sh
	.venv/bin/python -m pytest

lint:
	@scripts/bootstrap.sh
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.run
