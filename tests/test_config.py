from __future__ import annotations

import dataclasses
import re

from pathlib import Path

import pytest

from uploadguard.config import (
    SETTING_NAMES,
    ConfigError,
    ServerPool,
    Settings,
    default_temp_dir,
    format_size,
    parse_duration,
    parse_size,
    stream_caps,
)


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            pytest.param("0", 0, id="zero"),
            pytest.param("1024", 1024, id="bytes"),
            pytest.param("200M", 200 * 1024**2, id="nginx-style-M"),
            pytest.param("200m", 200 * 1024**2, id="lower-case"),
            pytest.param("1k", 1024, id="K"),
            pytest.param("2G", 2 * 1024**3, id="G"),
            pytest.param(" 50MB ", 50 * 1024**2, id="MB-suffix-and-spaces"),
            pytest.param("50MiB", 50 * 1024**2, id="MiB-suffix"),
            pytest.param("1.5G", 3 * 1024**3 // 2, id="decimal-G"),
            pytest.param("1.1G", 1181116006, id="decimal-rounded-down-exactly"),
            pytest.param("0.5k", 512, id="decimal-below-one-unit"),
            pytest.param("2.0M", 2 * 1024**2, id="decimal-zero-fraction"),
        ],
    )
    def test_accepts(self, text: str, expected: int) -> None:
        """Sizes are bytes or binary K/M/G multiples, as nginx's client_max_body_size."""
        assert parse_size(text) == expected

    @pytest.mark.parametrize("text", ["", "20X", "-1", "-1.5G", "1.5.0M", ".5M", "1,5M", "M", "twenty", "nan",
                                      "inf", "NaNG", "9" * 5000])
    def test_rejects_with_the_name_and_value(self, text: str) -> None:
        """A bad size names the variable and the value, and says what is allowed."""
        with pytest.raises(ConfigError) as info:
            parse_size(text, name="UPLOADGUARD_MAX_BODY_SIZE")
        assert f"UPLOADGUARD_MAX_BODY_SIZE={text!r}" in str(info.value)
        assert "K/M/G" in str(info.value)

    @pytest.mark.parametrize(("text", "words"), [
        pytest.param("0.5", "is not a whole number of bytes; a decimal needs a K/M/G suffix", id="half-a-byte"),
        pytest.param("1.5", "is not a whole number of bytes", id="decimal-bytes"),
        pytest.param("0.0000001K", "is less than one byte", id="rounds-to-nothing"),
        pytest.param("-1.5G", "must not be negative", id="negative"),
    ])
    def test_decimals_that_are_not_sizes_say_why(self, text: str, words: str) -> None:
        """A decimal of plain bytes, one that rounds down to nothing, or a negative one is refused with the reason."""
        with pytest.raises(ConfigError) as info:
            parse_size(text, name="UPLOADGUARD_MAX_BODY_SIZE")
        assert f"UPLOADGUARD_MAX_BODY_SIZE={text!r} {words}" in str(info.value)

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.5, -1])
    def test_rejects_non_sizes_of_other_types(self, value: float) -> None:
        """A typed framework value that is not whole non-negative bytes (NaN, infinity, a float, -1) is refused."""
        with pytest.raises(ConfigError, match="is not a size|must not be negative"):
            parse_size(value)  # type: ignore[arg-type]

    def test_too_large(self) -> None:
        """A size past what a file offset holds is refused with its own message."""
        with pytest.raises(ConfigError, match="is too large"):
            parse_size("9" * 20 + "T", name="UPLOADGUARD_MAX_BODY_SIZE")

    def test_format_round_trips(self) -> None:
        """format_size gives back the short form for exact multiples and bytes otherwise."""
        assert format_size(200 * 1024**2) == "200M"
        assert format_size(1025) == "1025"


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("5", 5), ("0.5", 0.5)],
    )
    def test_accepts(self, text: str, seconds: float) -> None:
        """Durations take seconds or an s/m/h/d suffix."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["soon", "-5", "9" * 400, "400000000d", "nan", "inf", "1e3"])
    def test_rejects(self, text: str) -> None:
        """A bad, huge or non-finite duration is a ConfigError naming the variable, never an OverflowError."""
        with pytest.raises(ConfigError, match=f"UPLOADGUARD_RETRY_AFTER={text!r}"):
            parse_duration(text, name="UPLOADGUARD_RETRY_AFTER")

    @pytest.mark.parametrize(("text", "seconds"), [("0.5", 1), ("1.2", 2), ("0", 0), ("3", 3)])
    def test_retry_after_rounds_up(self, text: str, seconds: int) -> None:
        """A fractional Retry-After is rounded up to whole seconds: 0.5 s is 1, never 0 (retry at once)."""
        assert Settings.from_environ({"UPLOADGUARD_RETRY_AFTER": text}).retry_after == seconds

    def test_huge_retry_after_from_the_environment(self) -> None:
        """A 400-digit UPLOADGUARD_RETRY_AFTER is one clear error, not an OverflowError from rounding."""
        with pytest.raises(ConfigError, match="UPLOADGUARD_RETRY_AFTER"):
            Settings.from_environ({"UPLOADGUARD_RETRY_AFTER": "9" * 400})


class TestSettingsFromEnviron:
    def test_defaults(self, tmp_path: Path) -> None:
        """Without variables the seed's production limits apply and the temp dir is per user."""
        settings = Settings.from_environ({"XDG_CACHE_HOME": str(tmp_path)})
        assert settings.max_body_size == 200 * 1024**2
        assert settings.retry_after == 5
        assert settings.temp_dir == tmp_path / "uploadguard" / "tmp"
        assert settings.drain_bytes == 2 * settings.max_body_size

    def test_drain_bound_without_a_limit(self, tmp_path: Path) -> None:
        """With the limit off the drain bound is 64 MiB, not 2 x 0: a 503 still reaches a client mid-upload."""
        settings = Settings(temp_dir=tmp_path, max_body_size=0)
        assert settings.drain_bytes == 64 * 1024**2
        assert settings.replace(drain_max=10).drain_bytes == 10

    def test_default_temp_dir_is_outside_tmp(self) -> None:
        """The default lives in the user's cache, not under /tmp that PrivateTmp and tmpfiles touch."""
        path = default_temp_dir({})
        assert path == Path.home() / ".cache" / "uploadguard" / "tmp"
        assert not str(path).startswith(("/tmp/", "/var/tmp/"))

    def test_every_variable(self, tmp_path: Path) -> None:
        """Each UPLOADGUARD_* variable sets its field."""
        settings = Settings.from_environ({
            "UPLOADGUARD_TEMP_DIR": str(tmp_path / "up"),
            "UPLOADGUARD_MAX_BODY_SIZE": "20M",
            "UPLOADGUARD_RETRY_AFTER": "2m",
            "UPLOADGUARD_MIN_FREE_SPACE": "1G",
            "UPLOADGUARD_DRAIN_MAX": "1M",
            "UPLOADGUARD_DRAIN_TIMEOUT": "3",
            "UPLOADGUARD_CHECK_INTERVAL": "0",
        })
        assert settings == Settings(
            temp_dir=tmp_path / "up", max_body_size=20 * 1024**2, retry_after=120,
            min_free_space=1024**3, drain_max=1024**2, drain_timeout=3.0, check_interval=0.0,
        )

    def test_empty_variables_mean_default(self) -> None:
        """An empty variable (as systemd's Environment=X= leaves it) falls back to the default."""
        settings = Settings.from_environ({"UPLOADGUARD_MAX_BODY_SIZE": "", "UPLOADGUARD_TEMP_DIR": " "})
        assert settings.max_body_size == 200 * 1024**2

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            pytest.param("UPLOADGUARD_MAX_BODY_SIZE", "20X", id="size"),
            pytest.param("UPLOADGUARD_RETRY_AFTER", "later", id="retry"),
            pytest.param("UPLOADGUARD_MIN_FREE_SPACE", "-5", id="negative"),
            pytest.param("UPLOADGUARD_DRAIN_TIMEOUT", "1x", id="timeout"),
        ],
    )
    def test_bad_value_names_the_variable(self, variable: str, value: str) -> None:
        """A bad value is a ConfigError naming the variable and the value."""
        with pytest.raises(ConfigError) as info:
            Settings.from_environ({variable: value})
        assert f"{variable}={value!r}" in str(info.value)

    def test_overrides_win_and_none_is_ignored(self, tmp_path: Path) -> None:
        """Keyword overrides beat the environment; None keeps the environment's value."""
        env = {"UPLOADGUARD_MAX_BODY_SIZE": "1M", "UPLOADGUARD_RETRY_AFTER": "9"}
        settings = Settings.from_environ(env, max_body_size="2K", retry_after=None, temp_dir=tmp_path)
        assert (settings.max_body_size, settings.retry_after, settings.temp_dir) == (2048, 9, tmp_path)

    def test_relative_temp_dir_becomes_absolute(self) -> None:
        """A relative temp dir is made absolute once, so a later chdir cannot move it."""
        assert Settings(temp_dir=Path("rel")).temp_dir.is_absolute()


class TestSettingsValidation:
    @pytest.mark.parametrize(
        "overrides",
        [
            pytest.param({"max_body_size": -1}, id="negative-size"),
            pytest.param({"retry_after": True}, id="bool"),
            pytest.param({"drain_timeout": -1.0}, id="negative-timeout"),
            pytest.param({"drain_max": -1}, id="negative-drain"),
        ],
    )
    def test_rejects(self, overrides: dict[str, object], tmp_path: Path) -> None:
        """Invalid field values raise ConfigError, never an assert."""
        with pytest.raises(ConfigError):
            Settings(temp_dir=tmp_path).replace(**overrides)

    def test_a_home_relative_path_is_the_home_directory(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """``~/x`` means what the defaults' ``~`` means, not a directory named ``~`` below the working directory."""
        monkeypatch.setenv("HOME", str(tmp_path))
        settings = Settings.from_environ({"UPLOADGUARD_TEMP_DIR": "~/spool", "UPLOADGUARD_RESUMABLE_STORAGE": "~/tus"})
        assert (settings.temp_dir, settings.resumable_storage) == (tmp_path / "spool", tmp_path / "tus")

    def test_unknown_field(self, tmp_path: Path) -> None:
        """A misspelt option is a TypeError naming it, not silently ignored."""
        with pytest.raises(TypeError, match="max_body"):
            Settings(temp_dir=tmp_path).replace(max_body="1M")

    def test_describe(self, tmp_path: Path) -> None:
        """describe() is one line with the effective values, for startup logs."""
        line = Settings(temp_dir=tmp_path).describe()
        assert "max_body_size=200M" in line and str(tmp_path) in line and "\n" not in line

    def test_describe_names_the_default_storage_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no storage set, the line names the default directory it resolves to, not the word "default"."""
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
        line = Settings(temp_dir=tmp_path).describe()
        assert f"resumable_storage={tmp_path / 'data' / 'uploadguard' / 'uploads'}(default) " in line
        line = Settings(temp_dir=tmp_path, resumable_storage=tmp_path / "mine").describe()
        assert f"resumable_storage={tmp_path / 'mine'} " in line


class TestOneReferenceTable:
    def test_the_generated_table_lists_every_setting_once(self) -> None:
        """The settings reference rendered from the code names exactly the settings Settings reads, in order."""
        from uploadguard.config import settings_reference

        rows = re.findall(r"^\| `(UPLOADGUARD_[A-Z_]+)` \|", settings_reference(), re.M)
        assert rows == list(SETTING_NAMES)

    def test_every_setting_has_a_default_and_a_meaning(self) -> None:
        """Each field has a one-line help entry (default as written, meaning), and no entry names a missing field."""
        from uploadguard.config import SETTING_HELP

        assert list(SETTING_HELP) == [field.name for field in dataclasses.fields(Settings)]
        for name, (default, meaning) in SETTING_HELP.items():
            assert default.strip() and meaning.strip() and "\n" not in meaning and "|" not in meaning, name

    def test_the_documented_defaults_are_the_code_defaults(self) -> None:
        """Each default the reference shows parses, with the setting's own parser, to the value the code uses."""
        from uploadguard.config import _PARSERS, SETTING_HELP, default_resumable_storage, default_temp_dir

        for field in dataclasses.fields(Settings):
            shown = SETTING_HELP[field.name][0]
            if field.name == "temp_dir":
                assert _PARSERS["temp_dir"](shown.strip("`"), name="temp_dir") == default_temp_dir({}), shown
            elif field.name == "drain_max":
                assert field.default is None and shown == "2 × limit"
            elif field.name == "resumable_storage":
                parsed = _PARSERS["resumable_storage"](shown.strip("`"), name="resumable_storage")
                assert field.default is None and parsed == default_resumable_storage({}), shown
            else:
                assert _PARSERS[field.name](shown.strip("`"), name=field.name) == field.default, field.name

    def test_no_page_copies_the_table_by_hand(self) -> None:
        """The docs and the README hold no hand-written settings rows: the only table is the one rendered."""
        root = Path(__file__).resolve().parent.parent
        for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
            assert not re.search(r"^\| `UPLOADGUARD_[A-Z_]+` \|", page.read_text(), re.M), page
        assert "<!-- uploadguard:settings-table -->" in (root / "docs" / "settings.md").read_text()

    def test_every_field_has_one_parser(self) -> None:
        """Each field is parsed by one function, whatever the source (environment, framework, keyword)."""
        from uploadguard.config import _PARSERS

        assert list(_PARSERS) == [field.name for field in dataclasses.fields(Settings)]


class TestStreamCaps:
    @pytest.mark.parametrize(("setting", "pool", "caps"), [
        pytest.param(None, ServerPool(5, 1, "sync"), (4, 0), id="sync-keeps-one-worker"),
        pytest.param(None, ServerPool(1, 1, "sync"), (1, 0), id="one-sync-worker-still-uploads"),
        pytest.param(None, ServerPool(2, 1, "sync"), (1, 0), id="two-sync-workers"),
        pytest.param(None, ServerPool(3, 4, "gthread"), (9, 3), id="gthread-keeps-a-thread-each"),
        pytest.param(None, ServerPool(2, 2, "gthread"), (2, 1), id="gthread-two-threads"),
        pytest.param(None, ServerPool(4, 1, "asgi"), (0, 0), id="event-loop-no-cap"),
        pytest.param(None, None, (0, 0), id="unknown-server-no-cap"),
        pytest.param(7, ServerPool(5, 1, "sync"), (7, 0), id="explicit"),
        pytest.param(0, ServerPool(5, 1, "sync"), (0, 0), id="explicit-off"),
    ])
    def test_caps(self, setting: int | None, pool: ServerPool | None, caps: tuple[int, int]) -> None:
        """auto leaves the rest of the site a worker (sync) or a thread per worker (gthread); a number caps the host."""
        assert stream_caps(setting, pool) == caps

    @pytest.mark.parametrize(("raw", "value"), [("auto", None), (" AUTO ", None), ("0", 0), ("12", 12), (3, 3)])
    def test_parsed(self, raw: str | int, value: int | None) -> None:
        """UPLOADGUARD_RESUMABLE_MAX_STREAMS takes auto or a whole number."""
        assert Settings.from_environ({"UPLOADGUARD_RESUMABLE_MAX_STREAMS": str(raw)}).resumable_max_streams == value

    @pytest.mark.parametrize("raw", ["-1", "2.5", "many", True])
    def test_refused(self, raw: object) -> None:
        """A bad value names the setting."""
        with pytest.raises(ConfigError, match="resumable_max_streams"):
            Settings.from_environ({}, resumable_max_streams=raw)
