import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSemanticSegmentation

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_testing import randomise_weights, small_config


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = randomise_weights(PCAAForSemanticSegmentation(small_config(bins=((2, 2), (4, 4))))).eval()
    model.save_pretrained(tmp_path)
    code = ["backbone_pcaa.py", "configuration_pcaa.py", "decode_heads_pcaa.py", "loss_pcaa.py", "modeling_pcaa.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", "model.safetensors", *code])
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == set(model.state_dict())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "pcaa"

    reloaded, info = PCAAForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not reloaded.training
    pixel_values = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        expected, observed = model(pixel_values), reloaded(pixel_values)
    assert torch.equal(expected.logits, observed.logits)
    for a, b in zip(expected.region_class_scores, observed.region_class_scores):
        assert torch.equal(a, b)

    auto = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    assert type(auto) is PCAAForSemanticSegmentation


def test_fine_tuning_with_another_label_set_reinitialises_the_classifiers(small_pcaa_folder):
    model, info = PCAAForSemanticSegmentation.from_pretrained(  # saved with 5 labels
        small_pcaa_folder, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = {key for key, *_ in info["mismatched_keys"]}
    assert {"decode_head.classifier.weight", "auxiliary_head.classifier.weight",
            "decode_head.pcaa_modules.0.cam_classifier.weight"} <= mismatched
    assert model.decode_head.classifier.weight.shape[0] == 3


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = PCAAForSemanticSegmentation(small_config(num_labels=3)).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, 48:] = 2
    pixel_values[:, 0] += labels * 1.5  # make the classes visible in the input
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(  # R50 at 64x64: stages 3 and 4 on 2x2 and 4x4 phases
    "depth, use_reentrant", [(18, False), (50, False), (18, True)]
)
def test_activation_checkpointing_gives_the_same_gradients_and_statistics(depth, use_reentrant):
    config = small_config(cam_dropout=0.0, backbone_depth=depth)
    plain = randomise_weights(PCAAForSemanticSegmentation(config)).train()
    checkpointed = randomise_weights(PCAAForSemanticSegmentation(config)).train()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.backbone.stages[0][0].gradient_checkpointing
    assert checkpointed.is_activation_checkpointing

    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))
    plain(pixel_values, labels=labels).loss.backward()
    checkpointed(pixel_values, labels=labels).loss.backward()

    plain_state, checkpointed_state = plain.state_dict(), checkpointed.state_dict()
    for name, value in plain_state.items():
        # The recomputation must not update the BatchNorm statistics a second time.
        torch.testing.assert_close(checkpointed_state[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert int(checkpointed_state["backbone.stages.0.0.conv1.norm.num_batches_tracked"]) == 1
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_every_n_layers_and_disable():
    model = PCAAForSemanticSegmentation(small_config()).train()
    blocks = [block for stage in model.backbone.stages for block in stage]
    model.activation_checkpointing_enable(every_n_layers=2)
    assert [block.gradient_checkpointing for block in blocks] == [True, False] * (len(blocks) // 2)
    model(torch.randn(2, 3, 64, 64), labels=torch.zeros(2, 64, 64, dtype=torch.long)).loss.backward()
    model.activation_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in blocks)

