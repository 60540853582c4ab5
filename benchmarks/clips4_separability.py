"""Can any rule that reads CLIP tell held-out-class segments from known-class ones on the toy world?

The toy CLIP's MaskCLIP features of toy train images, pooled over each ground-truth class region (the best segments a
model could cut), are scored per fold of the toy 4-fold protocol by statistics an unknown-prototype rule could use;
for each, the area under the ROC curve of "held-out" (0.5 = no information). Also: how often CLIP's best known class
is right on known-class segments, and how often the τ 0.01 known softmax calls a segment explained (best probability
≥ 0.5, the `gated` rule). Numbers quoted in ovseg/toyworld/README.md.

    python benchmarks/clips4_separability.py --root data/toyworld [--images 400]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def region_embeddings(root: str, images: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    from ovseg.data.seg_dataset import SegFileDataset
    from ovseg.models.clip import CLIPConfig, DenseCLIP
    from ovseg.models.text import TextBank

    clip = DenseCLIP(CLIPConfig(name="toyworld-vit", pretrained="toyworld", last_block="value", residual="token",
                                ffn=True)).eval()
    dataset = SegFileDataset("toyworld", root, "train")
    names = [synonyms[0] for synonyms in dataset.class_names]
    embeddings, labels = [], []
    with torch.no_grad():
        text = F.normalize(TextBank(clip.encode_text, "single").embed(names).float(), dim=-1)
        for i in range(min(images, len(dataset))):
            sample = dataset[i]
            features = F.normalize(clip.encode_dense(clip.normalize(sample["image"].float()[None] / 255)).float(),
                                   dim=1)[0]
            label = F.interpolate(sample["label"][None, None].float(), size=features.shape[-2:],
                                  mode="nearest")[0, 0].long()
            for c in label.unique().tolist():
                region = label == c
                if c != 255 and region.sum() >= 2:
                    embeddings.append(F.normalize(features[:, region].mean(1), dim=0))
                    labels.append(c)
    return torch.stack(embeddings), torch.tensor(labels), names, text


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties half."""
    a, b = score[positive].numpy()[:, None], score[~positive].numpy()[None]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/toyworld")
    parser.add_argument("--images", type=int, default=400)
    ns = parser.parse_args()
    from ovseg.data.folds import resolve_vocabulary

    segments, labels, names, text_all = region_embeddings(ns.root, ns.images)
    print(f"{len(segments)} class regions from {ns.images} toy train images")
    for fold in range(4):
        known = torch.tensor([names.index(n) for n in resolve_vocabulary(f"toyworld-fold{fold}")])
        held_out = ~torch.isin(labels, known)
        text = text_all[known]
        cosine = segments @ text.t()
        probability = F.softmax(cosine / 0.01, dim=-1)
        best = cosine.argmax(-1)
        top2 = cosine.topk(2, dim=-1).values
        centroids = F.normalize(probability.t() @ segments, dim=-1)  # the known classes' image-side centroids
        statistics = {"best cosine": cosine.max(-1).values, "best probability": probability.max(-1).values,
                      "margin": top2[:, 0] - top2[:, 1],
                      "cosine to the best class's image centroid": (segments * centroids[best]).sum(-1)}
        # low values should mean "held out": score = −statistic
        aucs = ", ".join(f"{k} {auc(-v, held_out):.2f}" for k, v in statistics.items())
        explained = probability.max(-1).values >= 0.5
        correct = known[best] == labels
        print(f"fold {fold}: held-out {held_out.float().mean():.2f} of the regions | AUC {aucs} | explained at τ 0.01: "
              f"known {explained[~held_out].float().mean():.2f}, held-out {explained[held_out].float().mean():.2f} | "
              f"best known class right on known regions {correct[~held_out].float().mean():.2f}")


if __name__ == "__main__":
    main()
