"""``explainkit methods``: the registered explainers and the plugin of each."""

from __future__ import annotations

import argparse
import json

from explainkit.plugins import plugin_distribution
from explainkit.registry import catalog

FAMILIES = ("gradient", "perturbation", "class-agnostic", "attention", "fusion", "other")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("methods", help="list registered explainers, their family and the plugin of each")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="only methods of this family (gradient, perturbation, class-agnostic, attention, fusion, other)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    registered = catalog()
    rows = [
        {"name": r.name, "family": r.family, "plugin": r.plugin, "distribution": " ".join(plugin_distribution(r.plugin)).strip()}
        for r in sorted(
            registered.explainers.values(),
            key=lambda r: (FAMILIES.index(r.family) if r.family in FAMILIES else len(FAMILIES), r.name),
        )
        if args.family is None or r.family == args.family
    ]
    clashes = [{"name": name, "plugins": plugins} for name, plugins in sorted(registered.clashes.items())]
    if args.json:
        print(json.dumps(rows + [{**c, "error": "registered by several plugins"} for c in clashes], indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=4)
    family_width = max((len(r["family"]) for r in rows), default=6)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['family']:<{family_width}}  {row['plugin']}  ({row['distribution']})")
    for clash in clashes:
        print(
            f"{clash['name']:<{width}}  CLASH: registered by {', '.join(clash['plugins'])}; disable one with EXPLAINKIT_DISABLE_PLUGINS"
        )
    return 0
