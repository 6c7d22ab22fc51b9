"""The image-segmentation pipeline for PCAA."""

from transformers.image_utils import load_image
from transformers.pipelines import ImageSegmentationPipeline

from pcaa_hf.model.image_processing_pcaa import open_image


class PCAASegmentationPipeline(ImageSegmentationPipeline):
    """
    `ImageSegmentationPipeline` that puts the model in eval mode (the stock pipeline leaves a model in training mode,
    where BatchNorm would update its statistics on every call) and hands images to the processor as stored (the stock
    pipeline converts them to RGB first, clipping 16-bit values and dropping transparency). Use it as
    `pipeline("image-segmentation", model=..., image_processor=..., pipeline_class=PCAASegmentationPipeline)`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.config.num_labels == 1:
            # transformers' pipeline names each value of the class map by id2label, which has no entry for value 1.
            raise ValueError("The image-segmentation pipeline names each predicted class by `id2label`; a binary model "
                             "with num_labels=1 predicts 0 and 1 with one name. Use post_process_semantic_segmentation "
                             "or a model with num_labels=2.")
        self.model.eval()

    def preprocess(self, image, subtask=None, timeout=None):
        image = open_image(image)
        if isinstance(image, str):  # a URL or base64 string: transformers' loader fetches it
            image = load_image(image, timeout=timeout)
        inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        inputs["target_size"] = [(image.height, image.width)]
        return inputs
