"""A recipe reference's ``seed``: a fixed seed, or 'same' (the holding recipe's), so a bench starts each
seed from its own init; absent, the reference trains with its own recipe's seed as before."""

from pathlib import Path

import pytest

from distill.core.recipe import load_recipe
from distill.core.refs import ref_recipe, resolved_recipe, trained_folder
from distill.errors import RecipeError


def test_seed_same_follows_the_holding_recipe():
    r = load_recipe("arithmetic-sft-more", ["init.seed=same", "seed=2"])
    init = ref_recipe(r, "init")
    assert init.seed == 2 and init.name == "arithmetic-sft"
    # each seed is its own cached init
    other = ref_recipe(load_recipe("arithmetic-sft-more", ["init.seed=same", "seed=1"]), "init")
    assert trained_folder(Path("runs"), init) != trained_folder(Path("runs"), other)
    assert resolved_recipe(r)["init"]["recipe"]["seed"] == 2


def test_fixed_seed_and_default():
    assert ref_recipe(load_recipe("arithmetic-sft-more", ["init.seed=3", "seed=1"]), "init").seed == 3
    plain = load_recipe("arithmetic-sft-more", ["seed=1", "init={recipe: arithmetic-sft}"])
    assert ref_recipe(plain, "init").seed == 0  # the referenced recipe's own seed
    assert "seed" not in resolved_recipe(plain)["init"]  # recipe.yaml and fingerprints as before


def test_seed_needs_a_recipe_reference(tmp_path):
    with pytest.raises(RecipeError, match="'seed' applies to a 'recipe' reference only"):
        load_recipe("mnist1d-kd", [f"teacher={{run: {tmp_path}, seed: 1}}"])
