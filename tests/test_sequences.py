"""Sequence datasets, their encoding and metrics, and the LSTM encoder/decoder (tiny sizes)."""

import json
import math

import numpy as np
import pytest
import torch

from rhovae.data.sequences import (
    END,
    LAYER_TOKENS,
    LETTERS,
    NAS201_OPS,
    SequenceVocab,
    decode,
    encode,
    encode_batch,
    is_valid_layers,
    is_valid_nas201,
    layers_dataset,
    load_dictionary,
    nas201_cells,
    nas201_dataset,
    nas201_string,
    parse_nas201,
    sample_layers,
    size_to_feature,
    to_text,
    words_dataset,
)
from rhovae.errors import RhovaeError
from rhovae.nets.lstm import LSTMDecoder, LSTMEncoder, SequenceDistribution, step_mask
from rhovae.sequence_metrics import sequence_metrics

NAS = SequenceVocab("nas201", NAS201_OPS, end=None, n_features=0, max_len=6)
LAYERS = SequenceVocab("layers", LAYER_TOKENS, end=LAYER_TOKENS.index(END), n_features=1, max_len=8)


def words_vocab(max_len=8, source=None):
    return SequenceVocab(
        "words", (*LETTERS, END), end=len(LETTERS), n_features=0, max_len=max_len, source=source
    )


def layer_stack(text_sizes):
    """``[("conv", 64), ("pool", 1), ...]`` as (tokens, features)."""
    return [t for t, _ in text_sizes], [size_to_feature(s) for _, s in text_sizes]


# --- datasets and encoding ----------------------------------------------------------------------------


def test_nas201_space_is_exactly_5_to_the_6_distinct_cells():
    cells = nas201_cells()
    assert len(cells) == len(set(cells)) == 5**6 == 15625
    train, val, test, vocab = nas201_dataset(None, seed=0)
    x = np.concatenate([train, val, test])
    assert x.shape == (15625, 6, 5) and x.dtype == np.float32 and (x.sum(-1) == 1).all()
    codes = {tuple(row) for row in x.argmax(-1)}
    assert len(codes) == 15625 and (len(train), len(val), len(test)) == (12501, 1562, 1562)
    again = nas201_dataset(None, seed=0)[0]
    other = nas201_dataset(None, seed=1)[0]
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_nas201_string_round_trips():
    text = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    ops = parse_nas201(text)
    assert ops == ["nor_conv_3x3", "none", "skip_connect", "avg_pool_3x3", "nor_conv_1x1", "skip_connect"]
    assert to_text(encode(ops, None, NAS), NAS) == text and decode(encode(ops, None, NAS), NAS) == (ops, None)
    assert all(parse_nas201(nas201_string(cell)) == list(cell) for cell in nas201_cells())
    with pytest.raises(RhovaeError, match="unknown operation 'conv'"):
        parse_nas201(text.replace("nor_conv_3x3", "conv"))


def test_nas201_validity_is_input_to_output_connectivity():
    none, skip, conv = "none", "skip_connect", "nor_conv_3x3"
    assert not is_valid_nas201([none] * 6)
    assert is_valid_nas201([none, none, none, skip, none, none])  # 0 -> 3 directly
    assert is_valid_nas201([skip, none, none, none, conv, none])  # 0 -> 1 -> 3
    assert is_valid_nas201([skip, none, conv, none, none, conv])  # 0 -> 1 -> 2 -> 3
    assert not is_valid_nas201([none, none, none, none, none, conv])  # 2 -> 3, but 2 unreachable
    assert not is_valid_nas201([skip] * 5)  # too short


def test_bad_inputs_give_one_line_errors():
    words = words_vocab(max_len=5)
    cases = [
        (([], None, words), "empty sequence"),
        ((list("café"), None, words), "unknown token 'é' at position 3"),
        ((list("abcde"), None, words), "limit of 4 plus the end token"),
        ((["none"] * 7, None, NAS), "limit of 6 for nas201"),
        ((["conv", "out"], None, LAYERS), "one feature per token"),
        ((["conv", "out"], [0.5, 1.5], LAYERS), r"\[0, 1\]"),
        (([END, "a"], None, words), "inside the sequence"),
    ]
    for args, message in cases:
        with pytest.raises(RhovaeError, match=message) as info:
            encode(*args)
        assert "\n" not in str(info.value)


def test_encode_decode_and_text_for_layers():
    tokens, features = layer_stack([("conv", 64), ("pool", 1), ("flatten", 1), ("dense", 128), ("out", 10)])
    x = encode(tokens, features, LAYERS)
    assert x.shape == (8, 7) and x[5, LAYERS.end] == 1 and not x[6:].any()
    assert to_text(x, LAYERS) == "conv64 pool flatten dense128 out10"
    back_tokens, back_features = decode(x, LAYERS)
    assert back_tokens == tokens and np.allclose(back_features, features)
    assert np.array_equal(encode_batch([tokens], [features], LAYERS)[0], x)
    # a trailing end token is accepted
    assert np.array_equal(encode([*tokens, END], features, LAYERS), x)


def test_vocab_serialises_to_json():
    vocab = words_vocab(source="/tmp/words")
    assert SequenceVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(RhovaeError, match="unknown sequence vocab keys: colour"):
        SequenceVocab.from_dict({**vocab.to_dict(), "colour": 1})


def test_words_parse_from_a_small_dictionary(tmp_path):
    path = tmp_path / "words"
    path.write_text("Apple\napple\ncafé\ndon't\nZebra\nab\nabcdefghijklmnop\nx-ray\n", encoding="utf-8")
    assert load_dictionary(path) == ["ab", "abcdefghijklmnop", "apple", "zebra"]
    train, val, test, vocab = words_dataset(tmp_path, seed=0, max_letters=5)
    assert vocab.max_len == 6 and vocab.width == 27 and vocab.source == str(path)
    texts = sorted(to_text(row, vocab) for row in np.concatenate([train, val, test]))
    assert texts == ["ab", "apple", "zebra"]
    with pytest.raises(RhovaeError, match="apt-get install wamerican") as info:
        words_dataset(None, 0, path=tmp_path / "missing")
    assert "\n" not in str(info.value)


def test_layers_grammar_samples_are_valid_and_broken_stacks_are_not():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens, features = sample_layers(rng)
        assert is_valid_layers(tokens, features), tokens
    train, val, test, vocab = layers_dataset(None, seed=0, n=60)
    rows = np.concatenate([train, val, test])
    assert len(rows) == 60 and len({to_text(r, vocab) for r in rows}) == 60
    assert all(is_valid_layers(*decode(r, vocab)) for r in rows)
    broken = [
        ["conv", "out"],  # no flatten
        ["flatten", "dense", "out"],  # no conv before flatten
        ["dense", "conv", "flatten", "out"],
        ["dense"] * 5 + ["out"],  # too deep
        ["conv", "pool", "pool", "flatten", "out"],
        ["dense"],  # no output layer
        ["dense", "out", "out"],
        ["dense", "softmax"],
    ]
    assert not any(is_valid_layers(t) for t in broken)
    assert is_valid_layers(["dense", "out"], [0.5, 0.4])
    assert not is_valid_layers(["dense", "out"], [0.5, 0.0])  # a 1-class output
    assert not is_valid_layers(["dense", "out"], [1.2, 0.4])


# --- metrics ------------------------------------------------------------------------------------------


def test_metrics_on_hand_made_words(tmp_path):
    (tmp_path / "words").write_text("a\nab\ncab\n")
    vocab = words_vocab(max_len=4, source=str(tmp_path / "words"))
    x = torch.tensor(encode_batch([list("cab"), list("ab")], None, vocab))
    recon = torch.tensor(encode_batch([list("cab"), list("ac")], None, vocab))
    samples = torch.tensor(encode_batch([list(w) for w in ["ab", "ab", "cab", "zz", "a"]], None, vocab))
    unterminated = torch.zeros(1, 4, 27)
    unterminated[0, torch.arange(4), torch.tensor([0, 1, 2, 0])] = 1  # "abca", no end within L
    samples = torch.cat([samples, unterminated])
    train = torch.tensor(encode_batch([list("ab")], None, vocab))
    m = sequence_metrics(recon, x, samples, train, vocab)
    assert m["recon_seq_acc"] == m["recon_seq_acc_types"] == 0.5
    assert m["recon_token_acc"] == pytest.approx(6 / 7)  # 4 + 3 real steps; "ac<end>" misses one
    assert m["validity"] == pytest.approx(4 / 6)  # ab, ab, cab, a
    assert m["uniqueness"] == pytest.approx(3 / 6)  # ab, cab, a
    assert m["novelty"] == pytest.approx(2 / 4)  # cab, a
    # a reconstruction that stops early or runs on is not a recovered sequence
    early = torch.tensor(encode_batch([list("ca"), list("abc")], None, vocab))
    m = sequence_metrics(early, x, samples, train, vocab)
    assert m["recon_seq_acc_types"] == 0 and m["recon_token_acc"] == pytest.approx(4 / 7)


def test_metrics_feature_tolerance_on_layers():
    tokens, features = layer_stack([("conv", 64), ("flatten", 1), ("out", 10)])
    x = torch.tensor(encode_batch([tokens, tokens], [features, features], LAYERS))
    recon = x.clone()
    recon[0, 0, -1] += 0.03  # within 0.05
    recon[1, 2, -1] += 0.1  # out10 -> out20
    m = sequence_metrics(recon, x, x, x[:1], LAYERS)
    assert m["recon_seq_acc_types"] == 1 and m["recon_seq_acc"] == 0.5 and m["recon_token_acc"] == 1
    assert m["validity"] == 1 and m["uniqueness"] == 0.5 and m["novelty"] == 0


# --- the LSTM encoder and decoder ---------------------------------------------------------------------


def tiny_decoder(vocab, latent_dim=3, hidden=8, **kwargs):
    torch.manual_seed(0)
    return LSTMDecoder(latent_dim, (vocab.max_len, vocab.width), vocab, hidden=hidden, **kwargs).double()


def layers_batch():
    stacks = [
        [("conv", 64), ("pool", 1), ("flatten", 1), ("dense", 128), ("out", 10)],
        [("dense", 32), ("out", 2)],
        [("conv", 8), ("flatten", 1), ("out", 100)],
    ]
    pairs = [layer_stack(s) for s in stacks]
    return torch.tensor(encode_batch([p[0] for p in pairs], [p[1] for p in pairs], LAYERS)).double()


def reference_log_prob(decoder, z, x):
    """``log p(x|z)`` of one sequence by an explicit loop over LSTM gates (PyTorch's i, f, g, o order)."""
    k_types, hidden = decoder.n_types, decoder.hidden
    x0, h, c = decoder.init(z).split([decoder.width, hidden, hidden])
    lstm = decoder.lstm
    w_ih, w_hh, bias = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0
    total, inputs = torch.zeros((), dtype=x.dtype), x0
    for t in range(x.shape[0]):
        if not x[t].any():
            break
        i, f, g, o = (w_ih @ inputs + w_hh @ h + bias).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        raw = decoder.out(h)
        k = int(x[t, :k_types].argmax())
        total = total + torch.log_softmax(raw[:k_types], 0)[k]
        if decoder.n_features and k != decoder.end:
            std = decoder.feature_std()
            normal = torch.distributions.Normal(torch.sigmoid(raw[k_types:]), std)
            total = total + normal.log_prob(x[t, k_types:]).sum()
        inputs = x[t]
    return total


def test_teacher_forced_log_prob_matches_a_step_by_step_loop():
    decoder = tiny_decoder(LAYERS).eval()
    x = layers_batch()
    z = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    px = decoder(z)
    assert isinstance(px, SequenceDistribution) and px.batch_shape == (3,) and px.event_shape == (8, 7)
    log_p = px.log_prob(x)
    assert log_p.shape == (3,)
    expected = torch.stack([reference_log_prob(decoder, z[b], x[b]) for b in range(3)])
    torch.testing.assert_close(log_p, expected, atol=1e-5, rtol=0)


def test_padding_is_irrelevant_and_iwae_shapes_work():
    vocab = words_vocab(max_len=8)
    decoder = tiny_decoder(vocab).eval()
    x = torch.tensor(encode_batch([list("cab"), list("a"), list("abcdefg")], None, vocab)).double()
    z = torch.randn(3, 3, dtype=torch.float64)
    px = decoder(z)
    padded = torch.cat([x, torch.zeros(3, 4, 27, dtype=x.dtype)], dim=1)
    torch.testing.assert_close(px.log_prob(padded), px.log_prob(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(decoder(z[:1]).log_prob(x[:1, :4]), px.log_prob(x)[:1], atol=1e-12, rtol=0)
    # IWAE: z (m * B, d) with x repeated, and z (m, B, d) broadcast against x (B, L, W)
    zm = torch.randn(2, 3, 3, dtype=torch.float64)
    flat = decoder(zm.reshape(6, 3)).log_prob(x.repeat(2, 1, 1))
    assert flat.shape == (6,)
    torch.testing.assert_close(decoder(zm).log_prob(x), flat.view(2, 3))

    torch.manual_seed(0)
    encoder = LSTMEncoder((8, 27), hidden=6, out_features=5).double()
    h = encoder(x)
    assert h.shape == (3, encoder.out_features) == (3, 5)
    torch.testing.assert_close(encoder(padded), h, atol=1e-12, rtol=0)
    assert step_mask(x).sum(-1).tolist() == [4, 2, 8]


def test_word_dropout_only_in_training():
    vocab = words_vocab()
    decoder = tiny_decoder(vocab, word_dropout=0.5)
    x = torch.tensor(encode_batch([list("cabbage")] * 4, None, vocab)).double()
    z = torch.zeros(4, 3, dtype=torch.float64)
    eval_lp = decoder.eval()(z).log_prob(x)
    assert torch.allclose(eval_lp, eval_lp[0].expand(4))
    torch.manual_seed(0)
    train_lp = decoder.train()(z).log_prob(x)
    assert torch.isfinite(train_lp).all() and not torch.allclose(train_lp, eval_lp)


def forced_decoder(vocab, successor, start, feature_of=None, big=20.0):
    """A decoder that, given a one-hot input of token i, emits token ``successor[i]`` (with feature
    ``feature_of[successor[i]]``), starting from the one-hot ``start``: hidden unit i remembers input i."""
    k_types = vocab.n_types
    decoder = tiny_decoder(vocab, hidden=k_types)
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.init[2].bias[start] = 1.0  # x0 = one-hot(start), h0 = c0 = 0
        lstm = decoder.lstm
        h = k_types
        lstm.bias_ih_l0[:h] = big  # input gate open
        lstm.bias_ih_l0[h : 2 * h] = -big  # forget gate closed: only the current input matters
        lstm.bias_ih_l0[3 * h :] = big  # output gate open
        lstm.weight_ih_l0[2 * h : 3 * h, :k_types] = big * torch.eye(k_types, dtype=torch.float64)
        unit = torch.sigmoid(torch.tensor(big)) * torch.tanh(
            torch.sigmoid(torch.tensor(big)) * math.tanh(big)
        )
        for i, j in successor.items():
            decoder.out.weight[j, i] = big
            if feature_of is not None:
                f = min(max(feature_of[j], 1e-6), 1 - 1e-6)
                decoder.out.weight[k_types, i] = math.log(f / (1 - f)) / unit
    return decoder


def test_free_running_generation_reproduces_a_forced_sequence():
    vocab = words_vocab(max_len=6)
    idx = vocab.index
    successor = {idx["z"]: idx["c"], idx["c"]: idx["a"], idx["a"]: idx["b"], idx["b"]: vocab.end}
    px = forced_decoder(vocab, successor, start=idx["z"])(torch.zeros(2, 3, dtype=torch.float64))
    expected = torch.tensor(encode(list("cab"), None, vocab)).double().expand(2, 6, 27)
    assert torch.equal(px.mean, expected)
    assert torch.equal(
        px.sample((4,), temperature=0.05, generator=torch.Generator().manual_seed(0))[3], expected
    )
    assert px.log_prob(expected).abs().max() < 1e-3  # it is all but certain of this sequence

    stack = [("conv", 64), ("pool", 1), ("flatten", 1), ("dense", 128), ("out", 10)]
    order = [LAYERS.index[t] for t, _ in stack] + [LAYERS.end]
    feature_of = {LAYERS.index[t]: size_to_feature(s) for t, s in stack} | {LAYERS.end: 0.0}
    successor = dict(zip(order[:-1], order[1:], strict=True)) | {LAYERS.end: order[0]}
    px = forced_decoder(LAYERS, successor, start=LAYERS.end, feature_of=feature_of)(
        torch.zeros(1, 3, dtype=torch.float64)
    )
    mean = px.mean
    assert to_text(mean[0], LAYERS) == "conv64 pool flatten dense128 out10"
    target = torch.tensor(encode(*layer_stack(stack), LAYERS)).double()
    torch.testing.assert_close(mean[0], target, atol=1e-4, rtol=0)
    assert mean[0, 5, -1] == 0 and not mean[0, 6:].any()  # the end step's feature, then padding


def test_generation_without_an_end_token_fills_every_step():
    decoder = tiny_decoder(NAS)
    px = decoder(torch.randn(5, 3, dtype=torch.float64))
    assert px.mean.shape == (5, 6, 5) and (px.mean.sum(-1) == 1).all()
    samples = px.sample((2,), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 5, 6, 5) and (samples.sum(-1) == 1).all()
    with pytest.raises(RhovaeError, match="temperature must be positive"):
        px.sample(temperature=0)


@pytest.mark.parametrize(
    ("cell", "dtype", "tol"),
    [
        ("lstm", torch.float64, 1e-12),
        ("gru", torch.float64, 1e-12),
        # float32 is what training uses: on CPU the padded LSTM runs oneDNN's fused kernel there, the
        # packed one ATen's step loop, so the two agree to rounding only
        ("lstm", torch.float32, 1e-5),
        ("gru", torch.float32, 1e-5),
    ],
)
def test_encoder_is_the_packed_bidirectional_rnn(cell, dtype, tol):
    """The two padded passes compute what one packed bidirectional RNN over the real steps computes
    (values and gradients), for ragged lengths, a full-length row and an all-padding row; checkpoints
    written with the bidirectional module's names load into it."""
    torch.manual_seed(0)
    width, hidden = 7, 5
    encoder = LSTMEncoder((9, width), hidden=hidden, cell=cell, out_features=4).to(dtype)
    reference = getattr(torch.nn, cell.upper())(width, hidden, batch_first=True, bidirectional=True).to(dtype)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            direction = encoder.backward_rnn if name.endswith("_reverse") else encoder.forward_rnn
            p.copy_(getattr(direction, name.removesuffix("_reverse")))
    lengths = torch.tensor([3, 9, 1, 0, 6])
    x = torch.randn(5, 9, width, dtype=dtype)
    x[torch.arange(9) >= lengths.unsqueeze(-1)] = 0.0
    x.requires_grad_(True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, lengths.clamp_min(1), batch_first=True, enforce_sorted=False
    )
    state = reference(packed)[1]
    h_n = state[0] if cell == "lstm" else state
    expected = encoder.proj(torch.cat([h_n[0], h_n[1]], dim=-1))
    got = encoder(x)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [x, *encoder.parameters()])
    ref_grads = torch.autograd.grad((expected * weights).sum(), [x, *reference.parameters()])
    torch.testing.assert_close(grads[0], ref_grads[0], atol=tol, rtol=tol)
    by_name = dict(zip([n for n, _ in reference.named_parameters()], ref_grads[1:], strict=True))
    for name, grad in zip([n for n, _ in encoder.named_parameters()], grads[1:], strict=True):
        direction, _, param = name.partition(".")
        if direction in ("forward_rnn", "backward_rnn"):
            key = param + ("_reverse" if direction == "backward_rnn" else "")
            torch.testing.assert_close(grad, by_name[key], atol=tol, rtol=tol)
    # the old layout: one bidirectional module called ``rnn``
    old = {f"rnn.{n}": p.detach().clone() for n, p in reference.named_parameters()}
    old.update({f"proj.{n}": p.detach().clone() for n, p in encoder.proj.named_parameters()})
    fresh = LSTMEncoder((9, width), hidden=hidden, cell=cell, out_features=4).to(dtype)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(x), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradients_reach_every_parameter(cell):
    torch.manual_seed(0)
    encoder = LSTMEncoder((8, 7), hidden=6, cell=cell).double()
    head = torch.nn.Linear(encoder.out_features, 2 * 3).double()
    decoder = tiny_decoder(LAYERS, word_dropout=0.2).train()
    x = layers_batch()
    mu, log_var = head(encoder(x)).chunk(2, dim=-1)
    z = mu + (0.5 * log_var).exp() * torch.randn_like(mu)
    loss = -decoder(z).log_prob(x).mean()
    loss.backward()
    for module in (encoder, decoder):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_constructor_errors():
    with pytest.raises(RhovaeError, match="unknown recurrent cell 'rnn'"):
        LSTMEncoder((6, 5), cell="rnn")
    with pytest.raises(RhovaeError, match="does not match the nas201 vocab"):
        LSTMDecoder(3, (7, 5), NAS)
    with pytest.raises(RhovaeError, match="word_dropout"):
        LSTMDecoder(3, (6, 5), NAS, word_dropout=1.0)
