"""bench/sass.py: SASS read back from NVIDIA's shader disk cache.

The fixture is a real cache file written by the NVIDIA driver (580, H100) while bench_matmul.py ran the default
128x128x8 tiles on a 4096^3 nn product; what is asserted here was read from its disassembly by hand.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import sass  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "sass" / "matmul_nn_h100.bin"


def test_show_reads_the_matmul_kernel(tmp_path, capsys):
    (tmp_path / "cache0.bin").write_bytes(FIXTURE.read_bytes())
    rows = sass.show(tmp_path, "SM90", tmp_path / "sass", min_instructions=0)
    mm = [r for r in rows if r["ffma"]]
    assert len(mm) == 1, rows
    k = mm[0]
    # One 8x8 outer product per iteration of the tile-row loop: the driver did not unroll it.
    assert k["ffma"] == 64 and k["lds"] == 8 and k["bar"] == 2 and k["local"] == 0
    assert 100 <= k["regs"] <= 128          # two 256-thread workgroups per SM
    inner = min(k["loops"], key=lambda lp: lp["n"])
    assert inner["ffma"] == 64 and inner["lds"] == 4 and inner["n"] == 83 and inner["stall"] > inner["n"]
    assert len(k["loops"]) == 2             # the tile-row loop inside the loop over slices
    # This kernel guarded its prefetch: the compiler copied one prefetched vec4 right after its load (IMAD.MOV
    # waiting on the load's scoreboard barrier), so the loop over slices waits for one global load at once.
    outer = max(k["loops"], key=lambda lp: lp["n"])
    assert outer["early"] == 1 and inner["early"] == 0
    text = capsys.readouterr().out
    assert "| cache0:" in text and "FFMA per static cycle" in text
    written = sorted((tmp_path / "sass").glob("*.sass"))
    assert written and any("FFMA" in p.read_text() for p in written)
    assert "BAR.SYNC" in "".join(p.read_text() for p in written)


def test_show_without_cache_files_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="collect"):
        sass.show(tmp_path, "SM90", None, 0)


def test_records_skip_garbage():
    data = b"junk" + sass.ZSTD_MAGIC + b"not a frame" + FIXTURE.read_bytes()
    recs = list(sass.records(data))
    assert any(r.startswith(sass.NVVM_MAGIC) for r in recs)


def test_collect_without_an_nvidia_driver_fails_clearly(tmp_path):
    # No NVIDIA driver writes a cache for a command that creates no pipeline (nor on lavapipe).
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), "collect", str(tmp_path), "--",
                        sys.executable, "-c", "pass"], capture_output=True, text=True)
    assert r.returncode != 0 and "wrote no shader cache" in r.stderr


def test_collect_needs_a_command(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), "collect", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "give the command" in r.stderr


def test_collect_copies_what_the_driver_wrote_and_drops_older_copies(tmp_path):
    # A stand-in for the driver: the command writes a record where __GL_SHADER_DISK_CACHE_PATH points.
    (tmp_path / "cache7.bin").write_bytes(b"from an earlier collect")
    writer = ("import os, pathlib; d = pathlib.Path(os.environ['__GL_SHADER_DISK_CACHE_PATH']) / 'GLCache' / 'x'; "
              "d.mkdir(parents=True); (d / 'k.bin').write_bytes(b'record'); "
              "assert os.environ['__GL_SHADER_DISK_CACHE'] == '1'")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), "collect", str(tmp_path), "--",
                        sys.executable, "-c", writer], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("cache*.bin")) == ["cache0.bin"]
    assert (tmp_path / "cache0.bin").read_bytes() == b"record"


def ins(addr, text, barrier=7, wait=0):
    return dict(addr=addr, text=text, stall=1, barrier=barrier, wait=wait)


def test_early_waits_are_loads_waited_for_before_anything_else_could_run():
    # LDG sets scoreboard barrier 2; the first instruction whose wait mask holds bit 2 waits for it.
    soon = [ins(0x10, "LDG.E.128 R4, [R2.U32+UR4]", barrier=2), ins(0x20, "FFMA R8, R9, R10, R8"),
            ins(0x30, "IMAD.MOV.U32 R92, RZ, RZ, R4", wait=1 << 2)]
    assert sass.early_waits(soon, []) == [(0x10, 0x30)]
    # A loop starts between the load and its use: its latency overlaps the loop, not counted.
    looped = soon[:2] + [ins(0x28, "FFMA R8, R9, R10, R8"), ins(0x2c, "BRA 0x28"), soon[2]]
    assert sass.back_edges(looped) == [(0x28, 0x2c)]
    assert sass.early_waits(looped, sass.back_edges(looped)) == []
    # Waited for further away than EARLY_WAIT instructions, or never (barrier 7: none set): not counted.
    far = soon[:2] + [ins(0x20 + i, "FFMA R8, R9, R10, R8") for i in range(sass.EARLY_WAIT)] + soon[2:]
    assert sass.early_waits(far, []) == []
    assert sass.early_waits([dict(soon[0], barrier=7)] + soon[1:], []) == []
