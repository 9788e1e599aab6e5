// Build step: the browser build of the SDK, one ES module with its dependencies (protobufjs, long) inside,
// at dist/browser/zhibo-client.js. The chat page (web/static/sdk/zhibo-client.js) serves a committed copy of
// it, so `cargo build` needs no npm; web/test/run.sh checks that the copy is byte-identical to a fresh build.
// The output depends only on the sources, the pinned packages and esbuild's pinned version.
import { build } from 'esbuild';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
await build({
  entryPoints: [join(here, '../dist/index.js')],
  outfile: join(here, '../dist/browser/zhibo-client.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2022',
  // Only Node needs `ws` (the browser has WebSocket): left as a dynamic import that never runs there.
  external: ['ws'],
  minify: true,
  legalComments: 'eof',
  banner: {
    js: '// @zhibo/client, browser build (clients/typescript, `npm run build`): do not edit. Licences: LICENSES.txt.',
  },
  logLevel: 'warning',
});
