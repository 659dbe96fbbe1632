"""The data section's rules fail at compose time, naming the key and the fix."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException

from qlora_exp.errors import ConfigError
from qlora_exp.schema import to_schema
from tests.support import compose_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.packing=packd"], r"data.packing: got 'packd'.*none, padding_free, packed"),
        (["data.overlength=cut"], r"data.overlength: got 'cut'.*drop, truncate, error"),
        (["data.format=csv"], r"data.format: got 'csv'.*sharegpt"),
        (["+data.role_map.observation=robot"], r"data.role_map.observation: maps to 'robot'"),
        (["data=hub"], r"hub_id"),
        (["data=local"], r"path"),
    ],
)
def test_bad_data_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises((ConfigError, HydraException), match=message):
        to_schema(compose_config("experiment=smoke", *overrides))


def test_user_data_settings_compose() -> None:
    schema = to_schema(
        compose_config(
            "experiment=smoke",
            "data=local",
            "data.path=/data/chat.jsonl",
            "data.format=sharegpt",
            "data.columns.conversations=dialog",
            "+data.role_map.observation=user",
            "data.packing=padding_free",
            "data.chat_template=chatml",
            "dry_run=true",
        )
    )
    data = schema.data
    assert (data.source, data.format, data.columns.conversations) == ("local", "sharegpt", "dialog")
    assert data.role_map == {"observation": "user"} and data.packing == "padding_free" and schema.dry_run


@pytest.mark.parametrize(
    ("overrides", "key", "fix"),
    [
        (["data.path=x.jsonl"], "data.path", "data=local data.path=x.jsonl"),
        (["data=hub", "data.hub_id=OWNER/NAME", "data.path=x.jsonl"], "data.path", "data=local"),
        (["data=local", "data.path=x.jsonl", "data.hub_id=OWNER/NAME"], "data.hub_id", "data=hub"),
        (["data.hub_config=en"], "data.hub_config", "data=hub data.hub_config=en"),
        (["data.revision=abc123"], "data.revision", "data=hub"),
    ],
)
def test_a_setting_the_source_does_not_read_is_refused_with_the_fix(
    overrides: list[str], key: str, fix: str
) -> None:
    """`data.path=my.jsonl` without `data=local` used to train on the synthetic rows in silence."""
    with pytest.raises(ConfigError, match=rf"{key}: is set but data.source=\w+ does not read it") as error:
        to_schema(compose_config(*overrides))
    assert fix in str(error.value)
