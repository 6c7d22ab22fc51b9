"""The image-segmentation pipeline for PCAA."""

from transformers.pipelines import ImageSegmentationPipeline


class PCAASegmentationPipeline(ImageSegmentationPipeline):
    """
    `ImageSegmentationPipeline` that puts the model in eval mode (the stock pipeline leaves a model in training mode,
    where BatchNorm would update its statistics on every call). Use it as
    `pipeline("image-segmentation", model=model, image_processor=processor, pipeline_class=PCAASegmentationPipeline)`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()
