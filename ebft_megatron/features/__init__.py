"""The frozen feature network and the feature moments (Gram matrices) rewards are built from."""

from ebft_megatron.features.network import (  # noqa: F401
    FeatureConfigError,
    FeatureMoments,
    build_feature_network,
    embed,
    load_feature_network,
)
