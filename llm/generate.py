"""Sample text from a trained language model: ``python -m llm.generate --checkpoint PATH --prompt TEXT``.

Prints the prompt, then its continuation as the tokens come, then a newline; ``--num-samples N``
prints N such texts, one after another, with a line ``---`` between them. The same seed gives the
same text; ``--stop TEXT`` ends it before TEXT. Exit codes: 0 done; 2 bad input (one line on
stderr); 130 interrupted (Ctrl-C); 1 when the reader of stdout went away or it cannot be written
(a full disk). Characters the output's encoding lacks print as "?".
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import NoReturn

import torch

from llm.cli import ArgParser, add_checkpoint, add_device, interrupted, one_line_warnings, run_program, stdout_gone
from llm.data.tokenizers import Tokenizer
from llm.errors import EXIT_USAGE, UsageError, print_error
from llm.models.gpt import GPT
from llm.training.tasks.lm_task import load_lm

SAMPLE_SEPARATOR = "---\n"
"""The line between two of --num-samples' texts."""
_REPLACEMENT = "\ufffd"  # what decoders print for a multi-byte character cut in half


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="llm-generate",
                       description="Continue a prompt with a language model trained by --task lm.")
    add_checkpoint(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (not empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                        help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sampling temperature; 0 always picks the most likely token (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only among the K most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample only among the most likely tokens that make up probability P (default: all)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="texts to sample, each from the prompt, printed one after another with a line --- "
                             "between them; the first is the text one sample gives (default: 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed: the same seed gives the same text (default: 0)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the text where it first holds TEXT, which is not printed (given more than once: "
                             "at the one the text completes first); e.g. <|endoftext|> for a GPT-2")
    add_device(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        # Python turns argv bytes that are not UTF-8 into lone surrogates ("\udcff" for 0xff): no tokenizer takes them
        raise UsageError(f"--prompt is not valid UTF-8 text (at character {e.start + 1})") from None
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens: got {args.max_new_tokens}, expected an integer >= 0")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples: got {args.num_samples}, expected an integer >= 1")
    if not 0 <= args.temperature < math.inf:  # also rejects nan
        raise UsageError(f"--temperature: got {args.temperature}, expected a finite number >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k: got {args.top_k}, expected an integer >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # also rejects nan
        raise UsageError(f"--top-p: got {args.top_p}, expected a number above 0 and at most 1")
    if "" in args.stop:
        raise UsageError("--stop must not be empty")
    if not 0 <= args.seed < 2**64:  # what torch.manual_seed takes
        raise UsageError(f"--seed: got {args.seed}, expected an integer from 0 to 2**64 - 1")


def stream_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int,
                temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None, top_p: float | None = None) -> Iterator[str]:
    """Yield the text that continues ``prompt_ids``, piece by piece, as it is sampled.

    Each step decodes the tokens since an anchor and yields what is new, so tokens
    that are only part of a character (byte and BPE tokenizers) print once the
    character is complete: a trailing replacement character is held back until
    the last token, and so is a run of byte tokens a byte-fallback decoder reads
    as one (Tokenizer.ends_unsettled). The anchor moves up every ANCHOR_EVERY tokens, where decoding
    from it is seen to give the same text as decoding everything (not so before a
    token whose decoder drops a leading space, or inside a character): each step
    then decodes a few hundred tokens, not the whole text, however long it grows.
    """
    device = next(model.parameters()).device
    idx = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    ids = list(prompt_ids)
    anchor, before, shown = 0, 0, ""  # decode(ids[anchor:]) goes on from character `before` of the whole text
    skip = len(tokenizer.decode(prompt_ids))  # characters of that decode not to yield: the prompt's
    tokens = model.generate_stream(idx, max_new_tokens, temperature, top_k, generator=generator, top_p=top_p,
                                   vocab=tokenizer.vocab_size)
    for i, token in enumerate(tokens, start=1):
        ids.append(token)
        if i % ANCHOR_EVERY == 0:
            anchor, before, skip, shown = _moved_anchor(tokenizer, ids, anchor, before, skip, shown)
        if i < max_new_tokens and tokenizer.ends_unsettled(ids):  # its bytes make characters with the next ones
            continue
        text = tokenizer.decode(ids[anchor:])[skip:]
        if i < max_new_tokens:
            text = text.rstrip(_REPLACEMENT)
        if len(text) > len(shown):
            # the text shown is kept to, even where a decoder would now give it otherwise: what follows it prints
            yield text[len(shown):]
            shown = text


def until_stop(pieces: Iterable[str], stops: list[str]) -> Iterator[str]:
    """The text of ``pieces`` up to the stop of ``stops`` it completes first, without it; the tokens after it
    are never sampled. Of two stops that end together, the one that starts first; so where the text ends does
    not depend on how it is split into pieces (one stop may begin before another and end after it). A piece's
    end that may begin a stop is held back until the next piece tells."""
    held = ""
    try:
        for piece in pieces:
            held += piece
            found = [(at + len(stop), at) for at, stop in ((held.find(stop), stop) for stop in stops) if at >= 0]
            if found:
                _, at = min(found)
                if at:
                    yield held[:at]
                return
            keep = max((k for stop in stops for k in range(1, len(stop)) if held.endswith(stop[:k])), default=0)
            if len(held) > keep:
                yield held[:len(held) - keep]
                held = held[len(held) - keep:]
    except KeyboardInterrupt:  # Ctrl-C: the text so far is printed whole, as it would be without a stop
        if held:
            yield held
        raise
    if held:
        yield held


ANCHOR_EVERY = 256
"""Tokens between attempts to move stream_text's anchor, each of which decodes the whole text once."""


def _moved_anchor(tokenizer: Tokenizer, ids: list[int], anchor: int, before: int, skip: int,
                  shown: str) -> tuple[int, int, int, str]:
    """stream_text's anchor moved to ANCHOR_EVERY // 2 tokens back, with what it tracks, where that is safe;
    else as it was. ``skip`` and ``shown`` are counted from the anchor, ``before`` from the start."""
    new_anchor = len(ids) - ANCHOR_EVERY // 2
    whole, tail = tokenizer.decode(ids), tokenizer.decode(ids[new_anchor:])
    new_before = len(whole) - len(tail)
    done = before + skip + len(shown)  # characters of the whole text yielded, the prompt's among them
    if not (whole.endswith(tail) and tail and _REPLACEMENT not in tail[:1] and before <= new_before <= done):
        return anchor, before, skip, shown
    cut = new_before - before  # characters of the old tail before the new anchor
    skip_cut = min(skip, cut)
    return new_anchor, new_before, skip - skip_cut, shown[cut - skip_cut:]


def main(argv: list[str] | None = None) -> int:
    one_line_warnings()
    if isinstance(sys.stdout, io.TextIOWrapper):  # a character the output's encoding lacks prints as "?", no crash
        sys.stdout.reconfigure(errors="replace")
    writing = False
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        model, tokenizer, ckpt = load_lm(args.checkpoint, args.device)
        broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if broken:  # a run that diverged: its probabilities are NaN, which no token can be drawn from
            raise UsageError(f"checkpoint {ckpt}: {broken} holds NaN or inf, so the model's probabilities are not "
                             f"numbers: sample from an earlier checkpoint")
        try:
            prompt_ids = tokenizer.encode(args.prompt)  # before any output: a char the vocabulary lacks fails here
        except UsageError as e:
            raise UsageError(f"--prompt: {e}") from None
        if not prompt_ids:
            raise UsageError(f"--prompt {args.prompt!r} encodes to no tokens")
        unknown = tokenizer.count_unknown(prompt_ids)
        if unknown:
            warnings.warn(f"--prompt: {unknown} of its {len(prompt_ids)} tokens are the unknown token: the model "
                          f"sees that token where the tokenizer has none for the text")
        torch.manual_seed(args.seed)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
        writing = True
        for sample in range(args.num_samples):  # one generator: each sample goes on from where the last one left it
            if sample:
                _write(SAMPLE_SEPARATOR)
            _write(args.prompt)
            pieces = stream_text(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                                 generator=generator, top_p=args.top_p)
            for piece in until_stop(pieces, args.stop):
                _write(piece)
            _write("\n")
    except UsageError as e:
        print_error(f"error: {e}")
        return EXIT_USAGE
    except FloatingPointError as e:  # finite weights whose logits are not: nothing to draw a token from
        if writing:
            print()  # off the line the text was printed on
        print_error(f"error: {e}: sample from an earlier checkpoint")
        return 1
    except KeyboardInterrupt:
        if not writing:  # loading the model
            return interrupted("no text generated")
        print(file=sys.stderr)  # off the line the text was printed on
        return interrupted("the text so far is all there is")
    except BrokenPipeError:  # the reader left (`| head`): nothing more to generate for
        stdout_gone()
        return 1
    except _OutputFailed as e:
        print_error(f"error: cannot write to stdout: {e}")
        stdout_gone()  # what is still buffered must not fail again at exit
        return 1
    return 0


class _OutputFailed(Exception):
    """Writing the text failed (a full disk, ...), for a reason other than its reader leaving."""


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise _OutputFailed(e.strerror or str(e)) from None


def run() -> NoReturn:
    """The command line's entry (llm-generate, ``python -m llm.generate``): main() as a process (cli.run_program)."""
    run_program(main)


if __name__ == "__main__":
    run()
