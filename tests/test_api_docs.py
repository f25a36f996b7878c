"""docs/api.md names every exported name and every field of the public dataclasses."""

from __future__ import annotations

import dataclasses
import re

import pytest

import poolscope
from helpers import ROOT

API = (ROOT / "docs" / "api.md").read_text()


@pytest.mark.parametrize("name", [n for n in poolscope.__all__])
def test_every_exported_name_is_documented(name):
    assert re.search(rf"`{re.escape(name)}[`(]", API), f"docs/api.md does not document poolscope.{name}"


@pytest.mark.parametrize("cls", [poolscope.PoolStats, poolscope.ScopeStats, poolscope.Comparison])
def test_every_field_is_documented(cls):
    heading = f"## `{cls.__name__}` fields"
    assert heading in API
    section = API.split(heading, 1)[1].split("\n## ", 1)[0]
    for field in dataclasses.fields(cls):
        assert f"`{field.name}`" in section, f"{cls.__name__}.{field.name} is not in docs/api.md"
