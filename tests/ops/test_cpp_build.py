"""cpp_build's build names: one build per CPU kind, torch, flags and shared-header version."""

from __future__ import annotations

from attnkit.ops import cpp_build


def test_a_changed_shared_header_gets_a_new_build_name(tmp_path, monkeypatch):
    # torch's rebuild check hashes only the .cpp source; a kernel whose header changed must
    # not load the old build
    monkeypatch.setattr(cpp_build, "CSRC", tmp_path)
    header = tmp_path / "vec.h"
    header.write_text("// version 1\n")
    flags = cpp_build.compile_flags()
    first = cpp_build.build_name("decode_attention", flags)
    assert cpp_build.build_name("decode_attention", flags) == first
    header.write_text("// version 2\n")
    second = cpp_build.build_name("decode_attention", flags)
    assert second != first
    assert second.startswith("attnkit_decode_attention_")
    assert cpp_build.build_name("decode_attention", [*flags, "-DX"]) != second
