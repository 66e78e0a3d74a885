"""The classic lesson's network on Fashion-MNIST: 784-50-10, sigmoid hidden
layer, softmax output, weights 0.01 * N(0, 1), biases zero, SGD at 0.1 on
minibatches of 100; train and test accuracy every epoch.

    python scripts/lesson.py [--epochs 10] [--data-dir DIR]
"""
import argparse
import sys

import numpy as np

import fastmlp
from fastmlp.datasets import DEBIAN_FASHION_MNIST, load_directory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST,
                        help="a directory holding the four IDX files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = load_directory(args.data_dir)
    model = fastmlp.MLP([784, 50, 10], activation="sigmoid", seed=args.seed)
    print(model)
    history = fastmlp.fit(model, x_train, y_train, epochs=args.epochs, batch_size=100,
                          optimizer="sgd", lr=0.1, validation_data=(x_test, y_test),
                          seed=args.seed, verbose=1)
    loss, accuracy = model.evaluate(x_test, y_test)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f}; compile {history.compile_time:.1f}s, "
          f"{1 / np.median(history.history['epoch_time']):.1f} epochs/s (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
