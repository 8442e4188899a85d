"""Config trees as flat dicts, for tests that compare two configs field by field."""


def flat(config, prefix=''):
  """{dotted field: value} over every leaf of a ConfigDict."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      out.update(flat(value, f'{name}.'))
    else:
      out[name] = value
  return out
