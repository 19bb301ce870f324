"""Image classification data (MNIST, Fashion-MNIST, CIFAR-10, sklearn digits) as NumPy arrays.

Everything is read from local files; nothing is ever downloaded.
"""

from ._augment import augment_batch as augment_batch
from ._batching import iterate_batches as iterate_batches
from ._batching import num_batches as num_batches
from ._cifar import load_cifar10 as load_cifar10
from ._datasets import load_dataset as load_dataset
from ._datasets import load_digits as load_digits
from ._datasets import load_fashion_mnist as load_fashion_mnist
from ._datasets import load_idx_folder as load_idx_folder
from ._datasets import load_mnist as load_mnist
from ._idx import DataError as DataError
from ._idx import read_idx as read_idx
from ._normalised import Dataset as Dataset
