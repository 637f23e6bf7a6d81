"""The lifted feature field: contrastive loss, a stable PCA view, instance colours."""
