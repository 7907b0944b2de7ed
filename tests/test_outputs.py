"""`core/outputs.py`: no output may replace an input, fail half-written, leave temp files behind
(errors, SIGTERM/SIGHUP, a SIGKILLed earlier run) or ignore the umask; and `llm convert` /
`llm quantize` refuse an -o into their own inputs with one line."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cli_run import llm
from llmkit.core.outputs import OutputError, atomic_output, check_output
from llmkit.errors import LlmkitError


def _temps(d):
    return sorted(p.name for p in d.iterdir() if ".llmkit-tmp-" in p.name)


def _write(dest, data=b"new", inputs=()):
    with atomic_output(dest, inputs) as tmp:
        tmp.write_bytes(data)


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def test_writes_atomically(tmp_path):
    dest = tmp_path / "out.bin"
    _write(dest, b"one")
    _write(dest, b"two")
    assert dest.read_bytes() == b"two" and _temps(tmp_path) == []


def test_dest_is_the_input_refused(tmp_path, monkeypatch):
    inp = tmp_path / "in.gguf"
    inp.write_bytes(b"input")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.gguf"
    link.symlink_to(inp)
    monkeypatch.chdir(tmp_path / "sub")
    for dest in (inp, link, "../in.gguf", tmp_path / "sub" / ".." / "in.gguf"):
        with pytest.raises(LlmkitError, match="is the input") as e:
            _write(dest, inputs=[inp])
        assert str(dest) in str(e.value) and str(inp) in str(e.value)
        assert "\n" not in str(e.value)
    # the input given relatively, the destination absolutely
    with pytest.raises(LlmkitError, match="is the input"):
        _write(inp, inputs=["../in.gguf"])
    assert inp.read_bytes() == b"input" and _temps(tmp_path) == []


def test_existing_file_of_an_input_directory_refused_new_file_allowed(hf_dir):
    for name in ("config.json", "model.safetensors"):
        before = (hf_dir / name).read_bytes()
        with pytest.raises(LlmkitError, match="input directory") as e:
            _write(hf_dir / name, inputs=[hf_dir])
        assert str(hf_dir) in str(e.value) and "\n" not in str(e.value)
        assert (hf_dir / name).read_bytes() == before
    _write(hf_dir / "model.gguf", inputs=[hf_dir])
    assert (hf_dir / "model.gguf").read_bytes() == b"new"


def test_directory_destination_is_one_line(tmp_path):
    with pytest.raises(LlmkitError, match="is a directory") as e:
        _write(tmp_path)
    assert "\n" not in str(e.value)


def test_special_file_destination_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LlmkitError, match="not a regular file"):
        _write(fifo)
    assert fifo.exists() and not fifo.is_file()


def test_missing_directory(tmp_path):
    with pytest.raises(LlmkitError, match="does not exist") as e:
        _write(tmp_path / "nope" / "out.gguf")
    assert "nope" in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LlmkitError, match="not writable"):
            _write(ro / "out.gguf")
    finally:
        ro.chmod(0o755)


def test_unwritable_directory_checked_with_access(tmp_path, monkeypatch):
    # what a non-root user meets in a read-only folder, also checkable as root
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if p == tmp_path else real_access(p, m))
    with pytest.raises(LlmkitError, match="not writable"):
        check_output(tmp_path / "out.gguf")


def test_os_error_while_writing_is_one_line_and_still_an_os_error(tmp_path):
    with pytest.raises(LlmkitError, match="out.gguf: Permission denied") as e:
        with atomic_output(tmp_path / "out.gguf"):
            raise PermissionError(13, "Permission denied")
    assert isinstance(e.value, OSError) and isinstance(e.value, OutputError)
    assert _temps(tmp_path) == []
    # an error naming another file (an input that cannot be read) is not a write error
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "out.gguf"):
            open(tmp_path / "missing.txt")
    assert _temps(tmp_path) == [] and not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        _write(tmp_path / "out.gguf")
    finally:
        os.umask(old)
    assert (tmp_path / "out.gguf").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_leaves_nothing(tmp_path, exc):
    dest = tmp_path / "out.gguf"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_output(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    assert dest.read_bytes() == b"old" and _temps(tmp_path) == []


def test_symlink_destination_replaces_its_target(tmp_path):
    target = tmp_path / "target.gguf"
    target.write_bytes(b"old")
    (tmp_path / "link.gguf").symlink_to(target)
    _write(tmp_path / "link.gguf")
    assert (tmp_path / "link.gguf").is_symlink() and target.read_bytes() == b"new"


def test_signal_handlers_installed_only_while_open(tmp_path):
    old_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: stays ignored
    try:
        with atomic_output(tmp_path / "a"), atomic_output(tmp_path / "b"):
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, old_term)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from llmkit.core.outputs import atomic_output
    with atomic_output(sys.argv[1]) as tmp:
        tmp.write_bytes(b"partial")
        time.sleep(60)
    """
)


def _start_holder(dest):
    """A process with an atomic output of `dest` open; returns it once its temp file exists."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(dest)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _temps(dest.parent):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"holder did not start: {p.communicate()[1].decode()}")
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up(tmp_path, sig):
    dest = tmp_path / "out.gguf"
    p = _start_holder(dest)
    p.send_signal(sig)
    rc = p.wait(timeout=30)
    p.stderr.close()
    assert rc != 0 and _temps(tmp_path) == [] and not dest.exists()


def test_leftover_of_a_killed_run_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "out.gguf"
    p = _start_holder(dest)
    p.kill()  # SIGKILL: no chance to clean up
    p.wait(timeout=30)
    p.stderr.close()
    leftover = _temps(tmp_path)
    assert len(leftover) == 1 and f"-{p.pid}-" in leftover[0]
    # a temp file of a live process (another run writing the same file now) is kept
    live = subprocess.Popen(["sleep", "60"])
    try:
        busy = tmp_path / f".out.gguf.llmkit-tmp-{live.pid}-abcd"
        busy.write_bytes(b"in progress")
        other = tmp_path / f".other.gguf.llmkit-tmp-{p.pid}-abcd"  # another destination's
        other.write_bytes(b"x")
        _write(dest)
        assert _temps(tmp_path) == sorted([busy.name, other.name])
        assert dest.read_bytes() == b"new"
    finally:
        live.kill()
        live.wait()


def test_own_pid_leftover_not_being_written_is_stale(tmp_path):
    # in a container the rerun of a killed run often gets its pid: only open outputs are live
    stale = tmp_path / f".out.gguf.llmkit-tmp-{os.getpid()}-0123"
    stale.write_bytes(b"x")
    with atomic_output(tmp_path / "out.gguf") as tmp:
        tmp.write_bytes(b"new")
        _write(tmp_path / "out.gguf", b"inner")  # a second writer keeps the first one's temp
        assert tmp.exists()
    assert not stale.exists() and _temps(tmp_path) == []


# -- the commands --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_convert_refuses_its_own_checkpoint_files(tmp_path, capsys, monkeypatch, name):
    pytest.importorskip("transformers")
    from hf_checkpoints import write_hf_llama

    hf = tmp_path / "hf"
    write_hf_llama(hf)
    capsys.readouterr()  # transformers' own progress output
    before = (hf / name).read_bytes()
    rc, _, err = llm(capsys, monkeypatch, "convert", hf, "-o", hf / name)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "refusing" in err and str(hf / name) in err
    assert (hf / name).read_bytes() == before and _temps(hf) == []
    # a new file in the checkpoint directory is fine
    rc, _, err = llm(capsys, monkeypatch, "convert", hf, "-o", hf / "model.gguf")
    assert rc == 0 and (hf / "model.gguf").stat().st_size > 0, err


def test_quantize_output_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from tiny_models import write_tiny_llama

    src = write_tiny_llama(tmp_path / "in.gguf")
    before = src.read_bytes()
    (tmp_path / "dir").mkdir()
    cases = [
        (tmp_path / "dir", "is a directory"),
        (tmp_path / "nope" / "o.gguf", "does not exist"),
        (tmp_path / "dir" / ".." / "in.gguf", "is the input"),
    ]
    for out, msg in cases:
        rc, _, err = llm(capsys, monkeypatch, "quantize", src, out, "Q8_0", "--allow-requantize")
        assert rc == 1 and msg in err and len(err.strip().splitlines()) == 1, (out, err)
    assert src.read_bytes() == before and _temps(tmp_path) == []


def test_perplexity_base_file_never_replaces_the_text(tmp_path, capsys, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("some text to score")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"not loaded: the output is checked first")
    for base in (text, model):
        rc, _, err = llm(
            capsys, monkeypatch, "perplexity", "-m", model, "-f", text, "--kl-divergence-base", base
        )
        assert rc == 1 and "is the input" in err and len(err.strip().splitlines()) == 1, err
    assert text.read_text() == "some text to score"


def test_mtp_train_outputs_checked_before_training(tmp_path):
    from llmkit.core.mtp_train.train import TrainConfig

    base, text = tmp_path / "base.gguf", tmp_path / "t.txt"
    base.write_bytes(b"base")
    text.write_text("text")
    head = str(tmp_path / "head.gguf")
    cases = [
        ({"out": str(base)}, "is the input"),
        ({"out": str(text)}, "is the input"),
        ({"merge": str(base)}, "is the input"),
        ({"ckpt": str(text)}, "is the input"),
        ({"merge": head}, "-o and --merge are the same file"),
        ({"ckpt": head}, "-o and --ckpt are the same file"),
        ({"out": str(tmp_path / "nope" / "h.gguf")}, "does not exist"),
    ]
    for change, msg in cases:
        cfg = TrainConfig(**{"base": str(base), "out": head, "text": [str(text)], **change})
        with pytest.raises(LlmkitError, match=msg):
            cfg.validate()
    # resuming rewrites the checkpoint it resumed from: allowed; the head may not replace it
    ckpt = str(tmp_path / "c.ckpt")
    TrainConfig(base=str(base), out=head, text=[str(text)], resume=ckpt, ckpt=ckpt).validate()
    with pytest.raises(LlmkitError, match="is the input"):
        TrainConfig(base=str(base), out=ckpt, text=[str(text)], resume=ckpt).validate()
