"""The training configs that ship with jattn, installed as the package ``jattn.configs``.

This folder is their only copy: ``pyproject.toml`` maps it into the package
(``package-dir``), so a clone, an editable install and a wheel all read these files.
Each module defines ``get_config(arg=None)`` (``arg="small"``: a seconds-long setting
for tests). Run one by name or by path::

    jattn-train --config dates --workdir /tmp/dates
    jattn-train --config dates:small --workdir /tmp/dates_small
    jattn-train --config configs/dates.py --workdir /tmp/dates

and load one in Python with ``jattn.train.load_config("dates", "small")``.
"""
