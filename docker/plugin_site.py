"""Make a plugin directory part of the image's Python: ``plugin_site.py PREFIX [--site DIR]``.

The lossd images set ``PIP_PREFIX=/opt/lossd-plugins``, so an image built FROM one installs a
plugin with a plain ``pip install`` (as the lossd user, no USER switch): pip puts it under
PREFIX and leaves alone what lossd already has (torch, lossd itself). This script writes
``lossd-plugins.pth`` into the interpreter's site-packages (or DIR), listing PREFIX's
site-packages, so Python imports from there and ``importlib.metadata`` sees the plugins'
``lossd.losses`` entry points.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

PTH = "lossd-plugins.pth"


def site_dirs(prefix: str) -> list[str]:
    """Where ``pip install --prefix PREFIX`` puts pure and platform packages."""
    vars_ = {"base": prefix, "platbase": prefix, "installed_base": prefix,
             "installed_platbase": prefix}
    found = [sysconfig.get_path(key, sysconfig.get_preferred_scheme("prefix"), vars=vars_)
             for key in ("purelib", "platlib")]
    return list(dict.fromkeys(found))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix")
    parser.add_argument("--site", default=sysconfig.get_path("purelib"),
                        help="the site-packages to write the .pth file into")
    args = parser.parse_args()
    lines = "".join(f"{path}\n" for path in site_dirs(args.prefix))
    Path(args.site, PTH).write_text(lines)
    print(f"{Path(args.site, PTH)}: {lines.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
