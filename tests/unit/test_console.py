"""The console a batch job reads: plain lines every train.log_every steps when it is not a terminal."""
import io

from moetron.train.metrics import Console


def _metrics(step):
    return {"step": step, "loss": 3.0 + 1 / step, "throughput/tokens_per_s": 12345.6, "throughput/mfu": 0.123,
            "moe/maxvio_batch": 0.25}


def test_without_a_terminal_the_progress_is_a_plain_line_every_log_every_steps(capsys):
    console = Console(True, 0, 5, log_every=2, stream=io.StringIO())  # a SLURM output file is no terminal
    for step in range(1, 6):
        console.update(_metrics(step))
    console.close("done")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [ln.split(" |")[0] for ln in lines[:-1]] == ["step 2/5", "step 4/5", "step 5/5"]  # and the last
    assert "| loss 3.5000 | 12,346 tok/s | MFU 12.30% | MaxVio 0.250 | ETA " in lines[0]
    assert "\r" not in out and lines[-1] == "done"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_it_is_a_bar_unless_progress_is_off(capsys):
    stream = _Terminal()
    console = Console(True, 0, 3, stream=stream)
    console.update(_metrics(1))
    console.close(None)
    assert "train:" in stream.getvalue() and capsys.readouterr().out == ""
    console = Console(False, 0, 3, stream=_Terminal())  # logging.progress=false still prints the lines
    console.update(_metrics(1))
    assert capsys.readouterr().out.startswith("step 1/3 | loss 4.0000")
