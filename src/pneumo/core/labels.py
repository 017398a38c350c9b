"""The vocabulary every stage shares: class names, label values and split names."""

NORMAL, PNEUMONIA = "NORMAL", "PNEUMONIA"
CLASSES = (NORMAL, PNEUMONIA)  # index = label: NORMAL is 0, PNEUMONIA is 1
SPLITS = ("train", "val", "test")


def class_name(label: int) -> str:
    return CLASSES[int(label)]
