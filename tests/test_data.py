from lightning_offload.data import RandomTokens, StdlibText, stdlib_bytes


def test_stdlib_text_is_deterministic_and_split() -> None:
    assert stdlib_bytes(5000).equal(stdlib_bytes(5000))
    data = StdlibText(max_bytes=20_000, seq_len=32, batch_size=4)
    data.setup()
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 32)
    assert inputs[:, 1:].equal(targets[:, :-1])
    assert len(data.val_set) == (1000 - 1) // 32


def test_random_tokens_shapes() -> None:
    inputs, targets = next(iter(RandomTokens(vocab_size=1000, seq_len=8, batch_size=2).train_dataloader()))
    assert inputs.shape == (2, 8) and int(inputs.max()) < 1000
