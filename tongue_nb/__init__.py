"""tongue_nb: train and compare deep backbones on multi-task tongue-photograph classification."""
from tongue_nb.data.labels import Labels, LabelError, load_labels
from tongue_nb.data.tasks import SchemaError, Task, TaskSchema, default_schema, load_schema

__version__ = "0.1.0"
__all__ = ["Labels", "LabelError", "SchemaError", "Task", "TaskSchema", "default_schema", "load_labels", "load_schema"]
