import torch

from pneumo.config import ModelConfig
from pneumo.models import SmallCNN, build_model


def test_one_logit_per_image_at_any_size():
    model = build_model(ModelConfig(channels=[8, 16, 32], stem_stride=2)).eval()
    for size in (48, 64, 224):
        assert model(torch.rand(3, 1, size, size)).shape == (3,)


def test_architecture_follows_config():
    model = SmallCNN([4, 8], stem_stride=1, dropout=0.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert convs[0].stride == (1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    # conv 1->4 (36) + BN (8) + conv 4->8 (288) + BN (16) + linear 8->1 (9)
    assert n_params == 36 + 8 + 288 + 16 + 9


def test_learns_a_trivial_task():
    torch.manual_seed(0)
    model = SmallCNN([8, 8], stem_stride=1, dropout=0.0)
    x = torch.rand(32, 1, 16, 16) * 0.5
    y = (torch.arange(32) % 2).float()
    x[y == 1, :, 4:12, 4:12] += 0.5  # positives carry a bright square
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
