"""The machine recipes (bundle/configs/recipes): every key known, every network buildable at its patch, and the
main job's --recipe option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from pipeline.cli import parsers as cli
from pipeline.data.checks import check_patch_size

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
CONFIG_FILES = ("train.yaml", "multi_gpu_train.yaml", "inference.yaml")
KNOWN = set().union(*(cli.config_keys(CONFIGS / name) for name in CONFIG_FILES))


def test_the_bundle_ships_the_recipes_the_issue_names():
    assert {"kaggle_2xT4", "single_large_gpu"} <= set(cli.recipe_names())


@pytest.mark.parametrize("name", cli.recipe_names())
def test_recipe_keys_exist_and_its_network_trains_at_its_patch(name):
    recipe = cli.load_recipe(name)
    assert cli.unknown_keys_message(recipe, KNOWN, "the bundle configs") is None
    text = (CONFIGS / "recipes" / f"{name}.yaml").read_text()
    assert "Sized for" in text and "bench_sizing.py" in text  # says what it was sized for and how
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "recipes" / f"{name}.yaml")])
    patch = parser.get_parsed_content("patch_size")
    check_patch_size(patch, parser.get_parsed_content("network_strides"))
    network = parser.get_parsed_content("network_def").to("meta").train()  # shapes only: no memory, no time
    x = torch.zeros([parser.get_parsed_content("batch_size"), 1, *patch], device="meta")
    out = network(x)
    heads = out.shape[1] if parser.get_parsed_content("deep_supervision") else 1
    assert out.shape[-3:] == tuple(patch) and heads >= 1


def test_command_line_wins_over_the_recipe_and_bad_recipes_are_one_line(tmp_path):
    merged = cli.with_recipe("kaggle_2xT4", {"epochs": 3}, KNOWN, "the configs")
    assert merged["epochs"] == 3 and merged["architecture"] == "dynunet" and merged["ema"] is True
    # the store (~29 GB for the Kaggle set) on the scratch disk, not in /kaggle/working (20 GB kept)
    assert Path(merged["cache_dir"]).is_absolute() and not merged["cache_dir"].startswith("/kaggle/working")
    bad = tmp_path / "mine.yaml"
    bad.write_text("architecture: dynunet\nepoch: 3\n")
    with pytest.raises(ValueError, match=r"recipe .*mine.yaml: unknown setting\(s\) 'epoch' \(did you mean 'epochs'"):
        cli.with_recipe(str(bad), {}, KNOWN, "the configs")
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="mine.yaml: a recipe is a mapping of bundle keys"):
        cli.load_recipe(str(bad))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--recipe", "no_such_box"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no_such_box.yaml: recipe not found; the bundle's recipes are kaggle_2xT4, single_large_gpu" in proc.stderr
