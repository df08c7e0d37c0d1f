"""`openrlaif judges` and `openrlaif datasets`: what ships with the package."""

from __future__ import annotations

import argparse

from openrlaif.config import PACKAGED_JUDGE_DIR, builtin_judge_names, read_yaml
from openrlaif.data.datasets import BUILTIN_DATASETS
from openrlaif.judges.prompts import builtin_template_names


def cmd_judges(args: argparse.Namespace) -> int:
    print("shipped judges (use the name, or a path to your own YAML file):")
    for name in builtin_judge_names():
        data = read_yaml(PACKAGED_JUDGE_DIR / f"{name}.yaml")
        print(f"  {name:24s} backend={data.get('backend')} model={data.get('model', '-')}")
    print("prompt templates (judge setting `template:`): " + ", ".join(builtin_template_names()))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    for ds in BUILTIN_DATASETS.values():
        print(f"  {ds.name:16s} {ds.description}")
    return 0


def add_judges_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_judges)


def add_datasets_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_datasets)


ARGUMENTS = {"judges": add_judges_arguments, "datasets": add_datasets_arguments}
