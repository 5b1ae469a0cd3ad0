// The physical floor under every durable figure (BENCHMARKS.md): what one 4 KB write and an
// fdatasync cost on the disk the benchmark's stores live on (os.tmpdir(), as in child.mjs) —
// appended to a growing file, and overwritten in place in space written before (as the
// write-ahead log does).
import { closeSync, fdatasyncSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const PAGE = Buffer.alloc(4096, 7)

/** Median milliseconds of `times` runs of `write(i)` followed by an fdatasync of `fd`. */
function medianMs(fd, times, write) {
  const took = []
  for (let i = 0; i < times; i++) {
    const started = process.hrtime.bigint()
    write(i)
    fdatasyncSync(fd)
    took.push(Number(process.hrtime.bigint() - started) / 1e6)
  }
  took.sort((a, b) => a - b)
  return took[Math.floor(took.length / 2)]
}

/** { appendMs, overwriteMs }: medians of `times` 4 KB writes, each followed by an fdatasync. */
export function measureFloor(times = 200) {
  const dir = mkdtempSync(join(tmpdir(), 'kvbench-floor-'))
  try {
    const appended = openSync(join(dir, 'appended'), 'w')
    const appendMs = medianMs(appended, times, () => writeSync(appended, PAGE))
    closeSync(appended)
    const inPlace = openSync(join(dir, 'in-place'), 'w')
    for (let i = 0; i < times; i++) writeSync(inPlace, PAGE)
    fdatasyncSync(inPlace)
    const overwriteMs = medianMs(inPlace, times, (i) => writeSync(inPlace, PAGE, 0, PAGE.length, i * PAGE.length))
    closeSync(inPlace)
    return { appendMs, overwriteMs }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
