# The two commands of the README, and the rest. Each sets up .venv/ first, to the level it
# needs (scripts/bootstrap.sh): serve (torch, lossd[server]), dev (+ the dev extra), test
# (+ the Debian packages and deploy lint tools of the tests).
.PHONY: serve test lint bench dist

serve:
	@scripts/bootstrap.sh serve
	.venv/bin/lossd serve

test:
	@scripts/bootstrap.sh test
	.venv/bin/python -m pytest

lint:
	@scripts/bootstrap.sh dev
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:
	@scripts/bootstrap.sh dev
	.venv/bin/python -m bench.run

# The wheel and the sdist of lossd (client and server in one distribution) into dist/.
dist:
	@scripts/bootstrap.sh dev
	rm -rf dist
	.venv/bin/python -m build --outdir dist .
