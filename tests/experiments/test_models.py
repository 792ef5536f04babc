import math

import pytest
import torch

from dynabound.experiments.models import (
    MLP,
    LSTMLanguageModel,
    count_parameters,
    densenet121,
    detach_hidden,
    resnet18,
    resnet34,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Batches of two are too small to share between threads; on a busy machine, threads
    # waiting for each other make these forwards ten times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mlp_shapes_and_size():
    model = MLP(784, 256, 10)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert count_parameters(model) == 784 * 256 + 256 + 256 * 10 + 10
    assert MLP(64, 32, 10)(torch.rand(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="expected 784 features"):
        model(torch.rand(2, 64))
    with pytest.raises(ValueError):
        MLP(784, 0, 10)


def test_resnet34_cifar_size_and_forward():
    torch.manual_seed(0)
    model = resnet34()
    assert count_parameters(model) == 21_282_122
    assert len(list(model.parameters())) == 110
    # The CIFAR stem keeps 32x32 resolution: a 3x3 convolution, no max-pooling.
    stem_conv = model.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert resnet34(num_classes=100).fc.out_features == 100


def test_resnet_backward_reaches_the_stem():
    model = resnet18()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_densenet121_cifar_size_and_forward():
    torch.manual_seed(0)
    model = densenet121()
    assert count_parameters(model) == 6_956_298
    stem = model.features[0]
    assert stem.out_channels == 64 and stem.kernel_size == (3, 3)
    # Channels after the last block: ((((64+192)/2+384)/2+768)/2+512) = 1024.
    assert model.fc.in_features == 1024
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    assert stem.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        type(model)([6, 12], compression=0.0)


def test_lstm_shapes_and_hidden():
    model = LSTMLanguageModel(50, embed_dim=16, hidden_dim=24, num_layers=3, dropout=0.2)
    h = model.init_hidden(4)
    assert [t.shape for t in h] == [(3, 4, 24), (3, 4, 24)]
    assert all(t.abs().sum() == 0 for t in h)
    tokens = torch.randint(0, 50, (7, 4))
    logits, (hn, cn) = model(tokens, h)
    assert logits.shape == (7, 4, 50)
    assert hn.shape == cn.shape == (3, 4, 24)
    logits2, _ = model(tokens)  # no hidden: starts from zeros
    assert logits2.shape == logits.shape
    with pytest.raises(ValueError, match=r"\[T, B\]"):
        model(tokens[:, 0])


def test_lstm_state_carries_across_windows():
    torch.manual_seed(0)
    model = LSTMLanguageModel(30, 8, 8, num_layers=2).eval()
    tokens = torch.randint(0, 30, (10, 3))
    full, _ = model(tokens, model.init_hidden(3))
    first, hidden = model(tokens[:6], model.init_hidden(3))
    detached = detach_hidden(hidden)
    assert all(not t.requires_grad for t in detached)
    assert all(torch.equal(a, b) for a, b in zip(hidden, detached, strict=True))
    second, _ = model(tokens[6:], detached)
    torch.testing.assert_close(torch.cat([first, second]), full)
    fresh, _ = model(tokens[6:], model.init_hidden(3))
    assert not torch.allclose(fresh, second)


def test_lstm_detached_hidden_stops_gradients():
    model = LSTMLanguageModel(20, 6, 6)
    tokens = torch.randint(0, 20, (4, 2))
    _, hidden = model(tokens)
    logits, _ = model(tokens, detach_hidden(hidden))
    logits.sum().backward()  # a second backward through the first window would fail
    logits, _ = model(tokens, hidden)
    logits.sum().backward(retain_graph=False)


def test_lstm_tied_weights_and_initial_perplexity():
    vocab = 1000
    tied = LSTMLanguageModel(vocab, 32, 32, tie_weights=True)
    untied = LSTMLanguageModel(vocab, 32, 32)
    assert tied.decoder.weight is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == vocab * 32
    with pytest.raises(ValueError, match="tie_weights"):
        LSTMLanguageModel(vocab, 32, 64, tie_weights=True)
    with pytest.raises(ValueError):
        LSTMLanguageModel(vocab, dropout=1.0)
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (20, 8))
    logits, _ = untied(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:-1].reshape(-1, vocab), tokens[1:].flatten())
    assert abs(math.exp(loss.item()) / vocab - 1) < 0.1  # starts near uniform over the vocabulary
