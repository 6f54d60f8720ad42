"""Generate the labelled sample image set (shapes that move, scale and change colour) used by the
quickstart, the tests and the benchmarks.

    python data/make_samples.py OUT [--per-class 60] [--test-per-class 20] [--size 64] [--jpg]

Same arguments, same bytes: the generator is seeded per (split, class). The code lives in
`retrieval.samples` so that the installed `retrieve demo` can use it too.
"""

from __future__ import annotations

import argparse

from retrieval.samples import CLASSES, SampleConfig, make_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=len(CLASSES), help="how many of the 8 shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpg", action="store_true", help="write JPEG instead of PNG")
    args = parser.parse_args()
    cfg = SampleConfig(
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        size=args.size,
        classes=CLASSES[: args.classes],
        seed=args.seed,
        format="jpg" if args.jpg else "png",
    )
    print(make_samples(args.out, cfg))


if __name__ == "__main__":
    main()
