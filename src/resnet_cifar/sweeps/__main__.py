"""``python -m resnet_cifar.sweeps <sweep dir>``: the sweep's report by hand."""

from resnet_cifar.sweeps.report import main

raise SystemExit(main())
